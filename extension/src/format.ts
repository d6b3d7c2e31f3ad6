// How numbers read in the sidebar, the run panel and the status bar (pure: no DOM, no JupyterLab).

/** Format seconds as h:mm:ss or m:ss; '–' when unknown (an ETA before the first steps). */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '–';
  }
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${rest}` : `${m}:${rest}`;
}

/** Format a time-axis tick: "0 s", "45 s", then as formatDuration ("2:05"). */
export function formatSeconds(value: number): string {
  const s = Math.max(0, Math.round(value));
  return s < 100 ? `${s} s` : formatDuration(s);
}

/** Format a byte count in GiB or MiB. */
export function formatBytes(bytes: number | null | undefined): string {
  if (!bytes) {
    return '0 MiB';
  }
  return bytes >= 1 << 30
    ? `${(bytes / (1 << 30)).toFixed(1)} GiB`
    : `${Math.round(bytes / (1 << 20))} MiB`;
}

/** Format a loss-like number with 4 significant digits. */
export function formatNumber(
  value: number | string | null | undefined
): string {
  if (typeof value === 'string') {
    return value; // NaN or Infinity, sent as text
  }
  if (value === null || value === undefined || !isFinite(value)) {
    return '–';
  }
  return Math.abs(value) >= 1e4 || (Math.abs(value) < 1e-3 && value !== 0)
    ? value.toExponential(2)
    : value.toPrecision(4);
}

/** Format an axis end or a legend value with 3 significant digits. */
export function formatTick(value: number): string {
  const a = Math.abs(value);
  return a !== 0 && (a >= 1e5 || a < 1e-3)
    ? value.toExponential(1)
    : String(Number(value.toPrecision(3)));
}

/** Format a step axis tick: whole steps as they are. */
export function formatStep(value: number): string {
  return Number.isInteger(value) ? String(value) : formatTick(value);
}
