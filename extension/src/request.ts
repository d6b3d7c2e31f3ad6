// What a call to the BigTrain API answers, or the message its failure shows (in the sidebar, the
// run panel, the "Could not stop the run" dialog). Pure: the caller sends the request.

/**
 * Send a request to nbtrain/api/`path` with `send` and return its JSON body; throw an Error
 * whose message says what went wrong, for the user: the server's own `message`, the status
 * with a hint where it helps, or that the server cannot be reached.
 */
export async function callAPI<T>(
  path: string,
  send: () => Promise<Response>
): Promise<T> {
  const where = `nbtrain/api/${path.split('?')[0]}`;
  let response: Response;
  try {
    response = await send();
  } catch (e) {
    throw new Error(
      `Cannot reach the Jupyter server (${where}: ${(e as Error).message}). Is it still running?`
    );
  }
  const text = await response.text();
  let body: any = undefined;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: an HTML error page from the server or a proxy in front of it
  }
  if (!response.ok) {
    throw new Error(failure(where, response, body));
  }
  if (body === undefined) {
    throw new Error(
      `${where} answered with something other than JSON: ${text.slice(0, 120)}`
    );
  }
  return body as T;
}

function failure(where: string, response: Response, body: any): string {
  const status = `${response.status} ${response.statusText}`.trim();
  const message = body && typeof body.message === 'string' ? body.message : '';
  if (response.status === 404 && (!message || message === 'Not Found')) {
    // The route itself is missing: the server runs without nbtrain's server extension.
    return (
      `${where}: ${status}. Is nbtrain's server extension enabled? ` +
      '(`jupyter server extension list` should list nbtrain.server; ' +
      '`jupyter server extension enable nbtrain.server`, then restart the server)'
    );
  }
  if (response.status >= 500) {
    return `${where}: ${message || status} (the Jupyter server's log has the traceback)`;
  }
  return message || `${where}: ${status}`;
}
