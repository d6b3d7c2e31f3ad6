// How durations (ETA, elapsed), losses and sizes read in the sidebar, status bar and run panel.
import {
  formatBytes,
  formatDuration,
  formatNumber,
  formatSeconds,
  formatStep,
  formatTick
} from '../format';

describe('formatDuration (ETA, elapsed)', () => {
  it('says – while unknown', () => {
    expect(formatDuration(null)).toBe('–');
    expect(formatDuration(undefined)).toBe('–');
    expect(formatDuration(Infinity)).toBe('–');
  });

  it('shows m:ss, then h:mm:ss', () => {
    expect(formatDuration(0)).toBe('0:00');
    expect(formatDuration(59.6)).toBe('1:00');
    expect(formatDuration(754)).toBe('12:34');
    expect(formatDuration(3725)).toBe('1:02:05');
  });
});

describe('formatSeconds (a time axis)', () => {
  it('shows seconds below 100 s, then m:ss', () => {
    expect(formatSeconds(0)).toBe('0 s');
    expect(formatSeconds(45.4)).toBe('45 s');
    expect(formatSeconds(125)).toBe('2:05');
    expect(formatSeconds(3725)).toBe('1:02:05');
  });

  it('never shows a negative time', () => {
    expect(formatSeconds(-2)).toBe('0 s');
  });
});

describe('formatNumber (losses)', () => {
  it('shows 4 significant digits', () => {
    expect(formatNumber(2.345678)).toBe('2.346');
    expect(formatNumber(0)).toBe('0.000');
  });

  it('switches to exponents for very large and very small values', () => {
    expect(formatNumber(123456)).toBe('1.23e+5');
    expect(formatNumber(0.000012)).toBe('1.20e-5');
  });

  it("shows a diverged loss as the server's text, and – when there is none", () => {
    expect(formatNumber('NaN')).toBe('NaN');
    expect(formatNumber(null)).toBe('–');
  });
});

describe('formatBytes', () => {
  it('shows MiB below a GiB, then GiB', () => {
    expect(formatBytes(undefined)).toBe('0 MiB');
    expect(formatBytes(300 * 2 ** 20)).toBe('300 MiB');
    expect(formatBytes(3.5 * 2 ** 30)).toBe('3.5 GiB');
  });
});

describe('axis and legend values', () => {
  it('formatTick keeps 3 significant digits, exponents at the extremes', () => {
    expect(formatTick(2.34567)).toBe('2.35');
    expect(formatTick(3300)).toBe('3300');
    expect(formatTick(0)).toBe('0');
    expect(formatTick(250000)).toBe('2.5e+5');
    expect(formatTick(0.0004)).toBe('4.0e-4');
  });

  it('formatStep shows whole steps as they are', () => {
    expect(formatStep(1200)).toBe('1200');
    expect(formatStep(12.5)).toBe('12.5');
  });
});
