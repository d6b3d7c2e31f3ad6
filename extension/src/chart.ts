// Small SVG line charts: the sidebar's sparklines and the run panel's charts (no chart library).

import { bounds, Box, Padding, Point, scales, toPixels } from './chart-scale';
import { formatStep, formatTick } from './format';

const SVG = 'http://www.w3.org/2000/svg';
export const COLORS = [
  '#1f77b4',
  '#ff7f0e',
  '#2ca02c',
  '#d62728',
  '#9467bd',
  '#8c564b',
  '#e377c2',
  '#7f7f7f'
];

export interface ISeries {
  label: string;
  points: Point[];
  color?: string;
  rightAxis?: boolean; // a scale of its own, on the right (tokens/s next to samples/s)
}

export interface IChartOptions {
  emptyText?: string; // what an empty chart says (translated by the caller)
  xFormat?: (x: number) => string; // default: a step number
  xFromZero?: boolean; // a time axis: seconds since the start, shown from 0
  yFromZero?: boolean; // values that are never negative (CPU %, memory) on a scale from 0
}

function element(
  name: string,
  attrs: { [key: string]: string | number }
): SVGElement {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, String(value));
  }
  return node;
}

function polyline(
  points: Point[],
  box: Box,
  w: number,
  h: number,
  pad: Padding,
  color: string
): SVGElement {
  const coords = toPixels(points, box, w, h, pad);
  if (coords.length === 1) {
    // one sample cannot make a line: show it as a dot
    const [cx, cy] = coords[0].map(c => c.toFixed(1));
    return element('circle', { cx, cy, r: 2.5, fill: color });
  }
  const text = coords
    .map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`)
    .join(' ');
  return element('polyline', {
    points: text,
    fill: 'none',
    stroke: color,
    'stroke-width': 1.5
  });
}

/** Draw a tiny loss curve without axes (the sidebar's sparkline). */
export function sparkline(
  tail: [number, number | string][],
  width = 70,
  height = 20
): SVGElement {
  const points = tail.filter(
    (p): p is [number, number] => typeof p[1] === 'number' && isFinite(p[1])
  );
  const svg = element('svg', {
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    class: 'nbtrain-sparkline'
  });
  const box = bounds([{ points }]);
  if (box) {
    svg.appendChild(
      polyline(
        points,
        box,
        width,
        height,
        [1, 2, 1, 2],
        'var(--jp-brand-color1, #1976d2)'
      )
    );
  }
  return svg;
}

function axisLabel(
  svg: SVGElement,
  x: number,
  y: number,
  anchor: string,
  text: string,
  color?: string
): void {
  const label = element('text', {
    x,
    y,
    'text-anchor': anchor,
    class: 'nbtrain-chart-axis'
  });
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
export function lineChart(
  title: string,
  series: ISeries[],
  options: IChartOptions = {},
  width = 420,
  height = 180
): HTMLElement {
  const box = document.createElement('div');
  box.className = 'nbtrain-chart';
  const heading = document.createElement('div');
  heading.className = 'nbtrain-chart-title';
  heading.textContent = title;
  box.appendChild(heading);
  const svg = element('svg', {
    width: '100%',
    height,
    viewBox: `0 0 ${width} ${height}`,
    preserveAspectRatio: 'none'
  });
  box.appendChild(svg);
  const drawn = series.filter(s => s.points.length > 0);
  const colored = drawn.map((s, i) => ({
    ...s,
    color: s.color || COLORS[i % COLORS.length]
  }));
  const ranges = scales(colored, options);
  if (!ranges) {
    const empty = element('text', {
      x: width / 2,
      y: height / 2,
      'text-anchor': 'middle',
      class: 'nbtrain-chart-empty'
    });
    empty.textContent = options.emptyText ?? '';
    svg.appendChild(empty);
    return box;
  }
  const [x0, x1] = ranges.x;
  const twoScales = ranges.left !== null && ranges.right !== null;
  const pad: Padding = [48, 8, ranges.right ? 48 : 8, 18];
  svg.appendChild(
    element('rect', {
      x: pad[0],
      y: pad[1],
      width: width - pad[0] - pad[2],
      height: height - pad[1] - pad[3],
      class: 'nbtrain-chart-frame'
    })
  );
  const xFormat = options.xFormat ?? formatStep;
  axisLabel(svg, pad[0], height - 4, 'start', xFormat(x0));
  axisLabel(svg, width - pad[2], height - 4, 'end', xFormat(x1));
  for (const side of ['left', 'right'] as const) {
    const range = ranges[side];
    if (range) {
      // On two scales each axis's numbers take the colour of its first series.
      const color = twoScales
        ? colored.find(s => !!s.rightAxis === (side === 'right'))?.color
        : undefined;
      const x = side === 'left' ? pad[0] - 4 : width - pad[2] + 4;
      const anchor = side === 'left' ? 'end' : 'start';
      axisLabel(svg, x, pad[1] + 8, anchor, formatTick(range[1]), color);
      axisLabel(svg, x, height - pad[3], anchor, formatTick(range[0]), color);
    }
  }
  for (const s of colored) {
    const [y0, y1] = (s.rightAxis ? ranges.right : ranges.left)!;
    svg.appendChild(
      polyline(s.points, [x0, x1, y0, y1], width, height, pad, s.color)
    );
  }
  const legend = document.createElement('div');
  legend.className = 'nbtrain-chart-legend';
  for (const s of colored) {
    const item = document.createElement('span');
    const last = s.points[s.points.length - 1][1];
    item.innerHTML = `<i style="background:${s.color}"></i>`;
    item.appendChild(
      document.createTextNode(
        `${s.label} ${formatTick(last)}${s.rightAxis && twoScales ? ' (right axis)' : ''}`
      )
    );
    legend.appendChild(item);
  }
  box.appendChild(legend);
  return box;
}
