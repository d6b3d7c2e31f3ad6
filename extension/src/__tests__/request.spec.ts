// What the sidebar, the run panel and the "Could not stop the run" dialog say when a call to the
// BigTrain API fails (src/request.ts), with the answers jupyter_server really gives.
import { callAPI } from '../request';

function answer(
  status: number,
  body: string,
  statusText = ''
): () => Promise<Response> {
  return () => Promise.resolve(new Response(body, { status, statusText }));
}

describe('callAPI', () => {
  it('returns the JSON body of a successful answer', async () => {
    const runs = { roots: ['/work/bigtrain-runs'], runs: [] };
    await expect(
      callAPI('runs', answer(200, JSON.stringify(runs)))
    ).resolves.toEqual(runs);
  });

  it("shows the server's own message of a 4xx answer", async () => {
    // nbtrain's handlers raise HTTPError(404, ...); APIHandler.write_error sends it as JSON.
    const body = { message: "no run 'nope' under the run roots", reason: null };
    await expect(
      callAPI('runs/nope', answer(404, JSON.stringify(body), 'Not Found'))
    ).rejects.toThrow(new Error("no run 'nope' under the run roots"));
  });

  it('says to enable the server extension when the route itself is missing', async () => {
    // Without nbtrain.server the server answers its HTML 404 page.
    const error = callAPI(
      'runs',
      answer(404, '<html><title>404: Not Found</title></html>', 'Not Found')
    );
    await expect(error).rejects.toThrow('nbtrain/api/runs: 404 Not Found');
    await expect(error).rejects.toThrow(
      'jupyter server extension enable nbtrain.server'
    );
  });

  it("points to the server's log for a 500", async () => {
    const body = { message: 'Internal Server Error', traceback: 'Traceback …' };
    await expect(
      callAPI(
        'machine',
        answer(500, JSON.stringify(body), 'Internal Server Error')
      )
    ).rejects.toThrow(
      new Error(
        "nbtrain/api/machine: Internal Server Error (the Jupyter server's log has the traceback)"
      )
    );
  });

  it('falls back to the status when an error has no message', async () => {
    await expect(
      callAPI('runs/x/stop', answer(403, '', 'Forbidden'))
    ).rejects.toThrow(new Error('nbtrain/api/runs/x/stop: 403 Forbidden'));
  });

  it('says the server cannot be reached when the request fails (server stopped)', async () => {
    const send = () => Promise.reject(new TypeError('Failed to fetch'));
    await expect(callAPI('runs', send)).rejects.toThrow(
      new Error(
        'Cannot reach the Jupyter server (nbtrain/api/runs: Failed to fetch). Is it still running?'
      )
    );
  });

  it('refuses a successful answer that is not JSON (a login page of a proxy)', async () => {
    // Handing it on as data made the sidebar fail later on a missing `runs` list.
    await expect(
      callAPI(
        'runs?x=1',
        answer(200, '<html><body>Please log in</body></html>')
      )
    ).rejects.toThrow(
      'nbtrain/api/runs answered with something other than JSON: <html><body>Please log in'
    );
  });

  it('returns null for an empty successful answer', async () => {
    await expect(callAPI('runs/x/stop', answer(200, ''))).resolves.toBeNull();
  });
});
