// The charts' axis ranges and point placement (src/chart-scale.ts): what the run panel's charts
// and the sidebar's sparklines show as their scales.
import { bounds, Point, scales, thin, toPixels } from '../chart-scale';

describe('thin', () => {
  it('keeps short series as they are', () => {
    const points: Point[] = [
      [1, 2],
      [2, 3]
    ];
    expect(thin(points, 5)).toEqual(points);
  });

  it('draws at most `count` points, spread over the series, and always the newest', () => {
    const points: Point[] = Array.from({ length: 10000 }, (_, i) => [i, i * 2]);
    const kept = thin(points, 800);
    expect(kept).toHaveLength(800);
    expect(kept[0]).toEqual([0, 0]);
    expect(kept[kept.length - 1]).toEqual([9999, 19998]);
    expect(kept[400][0]).toBeGreaterThan(4900);
    expect(kept[400][0]).toBeLessThan(5100);
  });
});

describe('bounds', () => {
  it('is null without points (the chart says "no data yet")', () => {
    expect(bounds([])).toBeNull();
    expect(bounds([{ points: [] }, { points: [] }])).toBeNull();
  });

  it('spans every series', () => {
    expect(
      bounds([
        {
          points: [
            [1, 5],
            [3, 2]
          ]
        },
        { points: [[7, -1]] }
      ])
    ).toEqual([1, 7, -1, 5]);
  });

  it('gives a single point an x range of one step and a y range around it', () => {
    // Without it the one point would divide by zero and vanish from the chart.
    expect(bounds([{ points: [[4, 2.5]] }])).toEqual([4, 5, 2.25, 2.75]);
  });

  it('puts a flat line at zero in the middle of a range of its own', () => {
    expect(
      bounds([
        {
          points: [
            [0, 0],
            [1, 0]
          ]
        }
      ])
    ).toEqual([0, 1, -0.5, 0.5]);
  });

  it('starts non-negative values at zero when asked (CPU %, memory)', () => {
    const cpu: Point[] = [
      [0, 180],
      [1, 200]
    ];
    expect(bounds([{ points: cpu }], true)).toEqual([0, 1, 0, 200]);
    expect(bounds([{ points: cpu }])).toEqual([0, 1, 180, 200]);
  });

  it('keeps negative values below zero even when asked to start at zero', () => {
    expect(
      bounds(
        [
          {
            points: [
              [0, -3],
              [1, 2]
            ]
          }
        ],
        true
      )
    ).toEqual([0, 1, -3, 2]);
  });
});

describe('scales', () => {
  const samples: Point[] = [
    [10, 30],
    [20, 32]
  ];
  const tokens: Point[] = [
    [10, 3000],
    [20, 3300]
  ];

  it('is null when no series has a point', () => {
    expect(
      scales([{ points: [] }, { points: [], rightAxis: true }])
    ).toBeNull();
  });

  it('gives right-axis series a scale of their own (tokens/s beside samples/s)', () => {
    const s = scales([
      { points: samples },
      { points: tokens, rightAxis: true }
    ]);
    expect(s).toEqual({ x: [10, 20], left: [30, 32], right: [3000, 3300] });
  });

  it('has no right scale without right-axis series', () => {
    expect(scales([{ points: samples }])!.right).toBeNull();
  });

  it('starts a time axis at zero', () => {
    expect(scales([{ points: samples }], { xFromZero: true })!.x).toEqual([
      0, 20
    ]);
  });

  it('applies yFromZero to both scales', () => {
    const s = scales(
      [{ points: samples }, { points: tokens, rightAxis: true }],
      {
        yFromZero: true
      }
    );
    expect(s!.left).toEqual([0, 32]);
    expect(s!.right).toEqual([0, 3300]);
  });
});

describe('toPixels', () => {
  const pad: [number, number, number, number] = [48, 8, 8, 18];

  it('maps the range to the frame: x to the right, larger y upwards', () => {
    const pixels = toPixels(
      [
        [0, 0],
        [10, 100]
      ],
      [0, 10, 0, 100],
      420,
      180,
      pad
    );
    expect(pixels).toEqual([
      [48, 162], // bottom left of the frame
      [412, 8] // top right
    ]);
  });

  it('draws a flat line across the middle of the frame', () => {
    const points: Point[] = [
      [1, 7],
      [2, 7]
    ];
    const pixels = toPixels(points, bounds([{ points }])!, 420, 180, pad);
    expect(pixels.map(p => p[1])).toEqual([85, 85]);
  });

  it('draws at most 800 points', () => {
    const points: Point[] = Array.from({ length: 5000 }, (_, i) => [i, i]);
    expect(toPixels(points, [0, 4999, 0, 4999], 420, 180, pad)).toHaveLength(
      800
    );
  });
});
