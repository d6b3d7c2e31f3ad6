// The extension's settings (schema/plugin.json, in seconds) -> the views' polling periods (ms).
import * as fs from 'fs';
import * as path from 'path';

import { DEFAULT_INTERVALS, intervalsFromSettings } from '../intervals';

const schema = JSON.parse(
  fs.readFileSync(
    path.join(__dirname, '..', '..', 'schema', 'plugin.json'),
    'utf8'
  )
);

describe('intervalsFromSettings', () => {
  it("uses the schema's defaults when nothing is set", () => {
    expect(intervalsFromSettings({})).toEqual(DEFAULT_INTERVALS);
    const defaults = Object.fromEntries(
      Object.entries(schema.properties).map(([key, p]: [string, any]) => [
        key,
        p.default
      ])
    );
    expect(intervalsFromSettings(defaults)).toEqual(DEFAULT_INTERVALS);
  });

  it('turns the seconds of each setting into milliseconds for its view', () => {
    expect(
      intervalsFromSettings({
        liveRefreshSeconds: 0.5,
        idleRefreshSeconds: 10,
        runPanelRefreshSeconds: 2.5
      })
    ).toEqual({ live: 500, idle: 10000, runPanel: 2500 });
  });

  it('keeps the default for a value the schema refuses', () => {
    for (const bad of [0, -1, 0.1, 4000, NaN, '2', null]) {
      expect(intervalsFromSettings({ liveRefreshSeconds: bad }).live).toBe(
        DEFAULT_INTERVALS.live
      );
    }
  });

  it("accepts the schema's limits", () => {
    const { minimum, maximum } = schema.properties.idleRefreshSeconds;
    expect(intervalsFromSettings({ idleRefreshSeconds: minimum }).idle).toBe(
      minimum * 1000
    );
    expect(intervalsFromSettings({ idleRefreshSeconds: maximum }).idle).toBe(
      maximum * 1000
    );
  });
});
