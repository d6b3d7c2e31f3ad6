// Small SVG line charts: the sidebar's sparklines and the run panel's charts (no chart library).

const SVG = 'http://www.w3.org/2000/svg';
export const COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f'];
const MAX_POINTS = 800; // drawing more than the pixels across buys nothing

export interface ISeries {
  label: string;
  points: [number, number][];
  color?: string;
  rightAxis?: boolean; // a scale of its own, on the right (tokens/s next to samples/s)
}

export interface IChartOptions {
  emptyText?: string;
  xFormat?: (x: number) => string; // default: a step number
  xFromZero?: boolean; // a time axis: seconds since the start, shown from 0
  yFromZero?: boolean; // values that are never negative (CPU %, memory) on a scale from 0
}

function element(name: string, attrs: { [key: string]: string | number }): SVGElement {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, String(value));
  }
  return node;
}

/** Return at most `count` points spread over `points`, keeping the last. */
export function thin(points: [number, number][], count = MAX_POINTS): [number, number][] {
  if (points.length <= count) {
    return points;
  }
  const stride = points.length / count;
  const kept: [number, number][] = [];
  for (let i = 0; i < count - 1; i++) {
    kept.push(points[Math.floor(i * stride)]);
  }
  kept.push(points[points.length - 1]);
  return kept;
}

function bounds(series: ISeries[], yFromZero = false): [number, number, number, number] | null {
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const s of series) {
    for (const [x, y] of s.points) {
      x0 = Math.min(x0, x); x1 = Math.max(x1, x);
      y0 = Math.min(y0, y); y1 = Math.max(y1, y);
    }
  }
  if (!isFinite(x0)) {
    return null;
  }
  if (x1 === x0) { x1 = x0 + 1; }
  if (yFromZero && y0 >= 0) { y0 = 0; }
  if (y1 === y0) {
    const pad = Math.abs(y0) * 0.1 || 0.5; // a flat line sits in the middle, on its own scale
    y0 -= pad; y1 += pad;
  }
  return [x0, x1, y0, y1];
}

function polyline(points: [number, number][], box: [number, number, number, number], w: number, h: number,
                  pad: [number, number, number, number], color: string): SVGElement {
  const [x0, x1, y0, y1] = box;
  const [left, top, right, bottom] = pad;
  const coords = thin(points).map(([x, y]) => {
    const px = left + ((x - x0) / (x1 - x0)) * (w - left - right);
    const py = top + (1 - (y - y0) / (y1 - y0)) * (h - top - bottom);
    return `${px.toFixed(1)},${py.toFixed(1)}`;
  });
  if (coords.length === 1) { // one sample cannot make a line: show it as a dot
    const [cx, cy] = coords[0].split(',');
    return element('circle', { cx, cy, r: 2.5, fill: color });
  }
  return element('polyline', { points: coords.join(' '), fill: 'none', stroke: color, 'stroke-width': 1.5 });
}

/** Draw a tiny loss curve without axes (the sidebar's sparkline). */
export function sparkline(tail: [number, number | string][], width = 70, height = 20): SVGElement {
  const points = tail.filter((p): p is [number, number] => typeof p[1] === 'number' && isFinite(p[1]));
  const svg = element('svg', { width, height, viewBox: `0 0 ${width} ${height}`, class: 'nbtrain-sparkline' });
  const box = bounds([{ label: '', points }]);
  if (box) {
    svg.appendChild(polyline(points, box, width, height, [1, 2, 1, 2], 'var(--jp-brand-color1, #1976d2)'));
  }
  return svg;
}

export function format(value: number): string {
  const a = Math.abs(value);
  return a !== 0 && (a >= 1e5 || a < 1e-3) ? value.toExponential(1) : String(Number(value.toPrecision(3)));
}

/** Format a time-axis tick: "0 s", "45 s", "2:05". */
export function formatSeconds(value: number): string {
  const s = Math.max(0, Math.round(value));
  if (s < 100) {
    return `${s} s`;
  }
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${rest}` : `${m}:${rest}`;
}

function formatStep(value: number): string {
  return Number.isInteger(value) ? String(value) : format(value);
}

function axisLabel(svg: SVGElement, x: number, y: number, anchor: string, text: string, color?: string): void {
  const label = element('text', { x, y, 'text-anchor': anchor, class: 'nbtrain-chart-axis' });
  if (color) {
    label.setAttribute('style', `fill: ${color}`);
  }
  label.textContent = text;
  svg.appendChild(label);
}

/**
 * Draw a chart of one or more series with its title, axis ranges and a legend.
 * Series share the left axis's scale, except those with `rightAxis`, which share one of their own.
 */
export function lineChart(title: string, series: ISeries[], options: IChartOptions = {}, width = 420, height = 180): HTMLElement {
  const box = document.createElement('div');
  box.className = 'nbtrain-chart';
  const heading = document.createElement('div');
  heading.className = 'nbtrain-chart-title';
  heading.textContent = title;
  box.appendChild(heading);
  const svg = element('svg', { width: '100%', height, viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: 'none' });
  box.appendChild(svg);
  const drawn = series.filter(s => s.points.length > 0);
  const colored = drawn.map((s, i) => ({ ...s, color: s.color || COLORS[i % COLORS.length] }));
  const left = colored.filter(s => !s.rightAxis);
  const right = colored.filter(s => s.rightAxis);
  const leftRange = bounds(left, options.yFromZero);
  const rightRange = bounds(right, options.yFromZero);
  if (!leftRange && !rightRange) {
    const empty = element('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle', class: 'nbtrain-chart-empty' });
    empty.textContent = options.emptyText ?? 'no data yet';
    svg.appendChild(empty);
    return box;
  }
  // One x range for both scales.
  const all = bounds(colored)!;
  const x0 = options.xFromZero ? 0 : all[0];
  const x1 = Math.max(all[1], x0 + 1);
  const pad: [number, number, number, number] = [48, 8, right.length ? 48 : 8, 18];
  svg.appendChild(element('rect', { x: pad[0], y: pad[1], width: width - pad[0] - pad[2],
                                    height: height - pad[1] - pad[3], class: 'nbtrain-chart-frame' }));
  const xFormat = options.xFormat ?? formatStep;
  axisLabel(svg, pad[0], height - 4, 'start', xFormat(x0));
  axisLabel(svg, width - pad[2], height - 4, 'end', xFormat(x1));
  const twoScales = leftRange !== null && rightRange !== null;
  if (leftRange) {
    const color = twoScales ? left[0].color : undefined;
    axisLabel(svg, pad[0] - 4, pad[1] + 8, 'end', format(leftRange[3]), color);
    axisLabel(svg, pad[0] - 4, height - pad[3], 'end', format(leftRange[2]), color);
  }
  if (rightRange) {
    const color = twoScales ? right[0].color : undefined;
    axisLabel(svg, width - pad[2] + 4, pad[1] + 8, 'start', format(rightRange[3]), color);
    axisLabel(svg, width - pad[2] + 4, height - pad[3], 'start', format(rightRange[2]), color);
  }
  for (const s of colored) {
    const range = (s.rightAxis ? rightRange : leftRange)!;
    svg.appendChild(polyline(s.points, [x0, x1, range[2], range[3]], width, height, pad, s.color));
  }
  const legend = document.createElement('div');
  legend.className = 'nbtrain-chart-legend';
  for (const s of colored) {
    const item = document.createElement('span');
    const last = s.points[s.points.length - 1][1];
    item.innerHTML = `<i style="background:${s.color}"></i>`;
    item.appendChild(document.createTextNode(`${s.label} ${format(last)}${s.rightAxis && twoScales ? ' (right axis)' : ''}`));
    legend.appendChild(item);
  }
  box.appendChild(legend);
  return box;
}
