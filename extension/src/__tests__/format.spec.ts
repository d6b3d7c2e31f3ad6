// How durations (ETA, elapsed), losses and sizes read in the sidebar, status bar and run panel:
// one table of (value, what the user reads) per formatter.
import {
  formatBytes,
  formatDuration,
  formatNumber,
  formatSeconds,
  formatStep,
  formatTick
} from '../format';

type Shown = [unknown, string][];
const TABLES: [string, (value: any) => string, Shown][] = [
  [
    'formatDuration (ETA, elapsed): – while unknown, m:ss, then h:mm:ss',
    formatDuration,
    [
      [null, '–'],
      [undefined, '–'],
      [Infinity, '–'],
      [0, '0:00'],
      [59.6, '1:00'],
      [754, '12:34'],
      [3725, '1:02:05']
    ]
  ],
  [
    'formatSeconds (a time axis): seconds below 100 s, then m:ss, never negative',
    formatSeconds,
    [
      [0, '0 s'],
      [45.4, '45 s'],
      [125, '2:05'],
      [3725, '1:02:05'],
      [-2, '0 s']
    ]
  ],
  [
    "formatNumber (losses): 4 significant digits, exponents at the extremes, a diverged loss as the server's text",
    formatNumber,
    [
      [2.345678, '2.346'],
      [0, '0.000'],
      [123456, '1.23e+5'],
      [0.000012, '1.20e-5'],
      ['NaN', 'NaN'],
      [null, '–']
    ]
  ],
  [
    'formatBytes: MiB below a GiB, then GiB',
    formatBytes,
    [
      [undefined, '0 MiB'],
      [300 * 2 ** 20, '300 MiB'],
      [3.5 * 2 ** 30, '3.5 GiB']
    ]
  ],
  [
    'formatTick (axes): 3 significant digits, exponents at the extremes',
    formatTick,
    [
      [2.34567, '2.35'],
      [3300, '3300'],
      [0, '0'],
      [250000, '2.5e+5'],
      [0.0004, '4.0e-4']
    ]
  ],
  [
    'formatStep: whole steps as they are',
    formatStep,
    [
      [1200, '1200'],
      [12.5, '12.5']
    ]
  ]
];

describe.each(TABLES)('%s', (_title, format, shown) => {
  it.each(shown)('%p reads %p', (value, text) => {
    expect(format(value)).toBe(text);
  });
});
