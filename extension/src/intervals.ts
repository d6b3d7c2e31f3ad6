// How often the views poll the server: the extension's settings (schema/plugin.json), in ms.

/** The polling periods, in milliseconds. */
export interface IIntervals {
  live: number; // sidebar and status bar while a run is live
  idle: number; // sidebar and status bar while none is
  runPanel: number; // an open run panel while its run is live
}

/** The schema's defaults: while JupyterLab has not loaded the settings, or without a settings registry. */
export const DEFAULT_INTERVALS: IIntervals = {
  live: 1000,
  idle: 3000,
  runPanel: 1000
};

const MIN_SECONDS = 0.25; // the schema's minimum: faster would load the server for nothing
const MAX_SECONDS = 3600;

/**
 * Map the settings (seconds, as the Settings Editor shows them) to polling periods (ms). A
 * value the schema would refuse (missing, not a number, out of range) keeps the default:
 * the views never stop polling or flood the server because of one bad value.
 */
export function intervalsFromSettings(settings: {
  [key: string]: unknown;
}): IIntervals {
  const ms = (key: string, fallback: number): number => {
    const seconds = settings[key];
    return typeof seconds === 'number' &&
      seconds >= MIN_SECONDS &&
      seconds <= MAX_SECONDS
      ? Math.round(seconds * 1000)
      : fallback;
  };
  return {
    live: ms('liveRefreshSeconds', DEFAULT_INTERVALS.live),
    idle: ms('idleRefreshSeconds', DEFAULT_INTERVALS.idle),
    runPanel: ms('runPanelRefreshSeconds', DEFAULT_INTERVALS.runPanel)
  };
}
