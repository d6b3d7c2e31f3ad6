// The charts' arithmetic, apart from the drawing (chart.ts): which points are drawn, the axis
// ranges, and where each point lands in the picture. Pure: no DOM.

export type Point = [number, number];
/** x0, x1, y0, y1: the data range a chart's frame shows. */
export type Box = [number, number, number, number];
/** left, top, right, bottom: the frame's distance from the picture's edges, in pixels. */
export type Padding = [number, number, number, number];

const MAX_POINTS = 800; // drawing more than the pixels across buys nothing

/** Return at most `count` points spread over `points`, keeping the last. */
export function thin(points: Point[], count = MAX_POINTS): Point[] {
  if (points.length <= count) {
    return points;
  }
  const stride = points.length / count;
  const kept: Point[] = [];
  for (let i = 0; i < count - 1; i++) {
    kept.push(points[Math.floor(i * stride)]);
  }
  kept.push(points[points.length - 1]);
  return kept;
}

/**
 * The range of all the series' points, or null when there are none. A single step still gets
 * an x range of 1, and a flat line a y range of its own around it (so it sits in the middle).
 */
export function bounds(
  series: { points: Point[] }[],
  yFromZero = false
): Box | null {
  let x0 = Infinity;
  let x1 = -Infinity;
  let y0 = Infinity;
  let y1 = -Infinity;
  for (const s of series) {
    for (const [x, y] of s.points) {
      x0 = Math.min(x0, x);
      x1 = Math.max(x1, x);
      y0 = Math.min(y0, y);
      y1 = Math.max(y1, y);
    }
  }
  if (!isFinite(x0)) {
    return null;
  }
  if (x1 === x0) {
    x1 = x0 + 1;
  }
  if (yFromZero && y0 >= 0) {
    y0 = 0;
  }
  if (y1 === y0) {
    const pad = Math.abs(y0) * 0.1 || 0.5;
    y0 -= pad;
    y1 += pad;
  }
  return [x0, x1, y0, y1];
}

export interface IScaleOptions {
  xFromZero?: boolean; // a time axis: seconds since the start, shown from 0
  yFromZero?: boolean; // values that are never negative (CPU %, memory) on a scale from 0
}

/** A chart's ranges: one x range for all series, a y range per axis (null: no series on it). */
export interface IScales {
  x: [number, number];
  left: [number, number] | null;
  right: [number, number] | null;
}

/**
 * The ranges of a chart of `series`, or null when no series has a point. Series with
 * `rightAxis` share a y scale of their own (tokens/s next to samples/s, ~100x larger: on one
 * scale samples/s would lie flat at the bottom).
 */
export function scales(
  series: { points: Point[]; rightAxis?: boolean }[],
  options: IScaleOptions = {}
): IScales | null {
  const all = bounds(series);
  if (!all) {
    return null;
  }
  const yRange = (box: Box | null): [number, number] | null =>
    box && [box[2], box[3]];
  const x0 = options.xFromZero ? 0 : all[0];
  return {
    x: [x0, Math.max(all[1], x0 + 1)],
    left: yRange(
      bounds(
        series.filter(s => !s.rightAxis),
        options.yFromZero
      )
    ),
    right: yRange(
      bounds(
        series.filter(s => s.rightAxis),
        options.yFromZero
      )
    )
  };
}

/** Where `points` (thinned) land in a `width` x `height` picture whose frame shows `box`. */
export function toPixels(
  points: Point[],
  box: Box,
  width: number,
  height: number,
  pad: Padding
): Point[] {
  const [x0, x1, y0, y1] = box;
  const [left, top, right, bottom] = pad;
  return thin(points).map(([x, y]) => [
    left + ((x - x0) / (x1 - x0)) * (width - left - right),
    top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)
  ]);
}
