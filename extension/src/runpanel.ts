// The main-area panel of one run: live charts, per-rank usage, DeepSpeed config, cell, log tail.
import { showErrorMessage } from '@jupyterlab/apputils';
import { TranslationBundle } from '@jupyterlab/translation';
import { Widget } from '@lumino/widgets';

import { api, IMetricRecord, IRunDetail } from './api';
import {
  formatBytes,
  formatDuration,
  formatNumber,
  formatSeconds
} from './format';
import { showPhase } from './phase';
import { ISeries, lineChart } from './chart';

const KNOWN = new Set([
  'step',
  'rank',
  'time',
  'loss',
  'eval_loss',
  'lr',
  'samples_per_s',
  'tokens_per_s',
  'step_time_s',
  'epoch'
]);
const MAX_USAGE_POINTS = 3600; // an hour of once-a-second samples per rank

export class RunPanel extends Widget {
  /** `interval`: the current polling period in ms (the extension's settings, read at each poll). */
  constructor(
    readonly runId: string,
    private interval: () => number,
    private trans: TranslationBundle
  ) {
    super();
    this.id = `nbtrain-run-${runId}`;
    this.addClass('nbtrain-run-panel');
    this.title.label = runId;
    this.title.closable = true;
    this.node.innerHTML =
      '<div class="nbtrain-panel-header"><h2></h2><span class="nbtrain-badge"></span>' +
      '<button class="jp-mod-styled jp-mod-warn nbtrain-stop">Stop</button></div>' +
      '<div class="nbtrain-panel-progress"></div><div class="nbtrain-phase"></div><div class="nbtrain-panel-reason"></div>' +
      '<div class="nbtrain-charts"></div><div class="nbtrain-panel-workers"></div>' +
      '<details open class="nbtrain-config"><summary>DeepSpeed config</summary><pre></pre></details>' +
      '<details class="nbtrain-cell"><summary>Cell</summary><pre></pre></details>' +
      '<details open class="nbtrain-log"><summary>Log tail <select></select></summary><pre></pre></details>';
    const stop = this.node.querySelector('.nbtrain-stop') as HTMLButtonElement;
    stop.onclick = () => {
      stop.disabled = true;
      api
        .stop(runId)
        .catch(e =>
          showErrorMessage(
            trans.__('Could not stop the run'),
            (e as Error).message
          )
        )
        .finally(() => this.poll());
    };
    (
      this.node.querySelector('.nbtrain-log select') as HTMLSelectElement
    ).onchange = () => void this.poll();
  }

  protected onAfterAttach(): void {
    void this.poll();
  }

  protected onBeforeDetach(): void {
    window.clearTimeout(this.timer);
  }

  dispose(): void {
    window.clearTimeout(this.timer);
    super.dispose();
  }

  /** Fetch what is new, redraw, and come back while the run is live. */
  async poll(): Promise<void> {
    window.clearTimeout(this.timer);
    try {
      const [detail, metrics] = await Promise.all([
        api.run(this.runId),
        api.metrics(this.runId, this.cursor)
      ]);
      this.cursor = metrics.cursor;
      this.merge(metrics.records);
      this.sampleUsage(detail);
      const select = this.node.querySelector(
        '.nbtrain-log select'
      ) as HTMLSelectElement;
      const rank = Number(select.value || 0);
      const log = await api.log(this.runId, rank);
      this.render(detail, log.lines);
      this.final = ['succeeded', 'failed', 'stopped'].includes(
        detail.status.state
      );
    } catch (e) {
      (
        this.node.querySelector('.nbtrain-panel-reason') as HTMLElement
      ).textContent = (e as Error).message;
    }
    if (!this.final && !this.isDisposed) {
      window.clearTimeout(this.timer); // a poll() started while this one waited: one timer, not two loops
      this.timer = window.setTimeout(() => void this.poll(), this.interval());
    }
  }

  private merge(records: IMetricRecord[]): void {
    for (const record of records) {
      const key = `${record.rank}:${record.step}`;
      this.rows.set(key, { ...(this.rows.get(key) || {}), ...record });
    }
  }

  private sampleUsage(detail: IRunDetail): void {
    const now = Date.now() / 1000;
    for (const w of detail.workers) {
      if (!w.alive) {
        continue;
      }
      const cpu = (this.cpu[w.rank] = this.cpu[w.rank] || []);
      const rss = (this.rss[w.rank] = this.rss[w.rank] || []);
      if (w.cpu_percent !== undefined) {
        // none yet: the server measures CPU over half a second at least
        cpu.push([now, w.cpu_percent]);
      }
      rss.push([now, (w.rss_bytes ?? 0) / (1 << 20)]);
      cpu.splice(0, Math.max(0, cpu.length - MAX_USAGE_POINTS));
      rss.splice(0, Math.max(0, rss.length - MAX_USAGE_POINTS));
    }
  }

  private series(key: string, ranks: 'rank0' | 'all' = 'rank0'): ISeries[] {
    const byRank = new Map<number, [number, number][]>();
    const rows = [...this.rows.values()].sort((a, b) => a.step - b.step);
    for (const row of rows) {
      const value = row[key];
      if (typeof value !== 'number' || (ranks === 'rank0' && row.rank !== 0)) {
        continue;
      }
      const points = byRank.get(row.rank) || [];
      points.push([row.step, value]);
      byRank.set(row.rank, points);
    }
    return [...byRank.entries()]
      .sort((a, b) => a[0] - b[0])
      .map(([rank, points]) => ({
        label: ranks === 'all' ? `${key} rank ${rank}` : key,
        points
      }));
  }

  private render(detail: IRunDetail, log: string[]): void {
    const status = detail.status;
    const name = detail.run.name || detail.id;
    this.title.label = `BigTrain: ${name}`;
    (this.node.querySelector('h2') as HTMLElement).textContent = name;
    const badge = this.node.querySelector('.nbtrain-badge') as HTMLElement;
    badge.textContent = status.state;
    badge.className = `nbtrain-badge nbtrain-state-${status.state}`;
    const final = ['succeeded', 'failed', 'stopped'].includes(status.state);
    (this.node.querySelector('.nbtrain-stop') as HTMLElement).style.display =
      final ? 'none' : '';
    const steps = [...this.rows.values()]
      .filter(r => r.rank === 0)
      .map(r => r.step);
    const step = steps.length ? Math.max(...steps) : 0;
    const losses = this.series('loss')[0]?.points || [];
    const elapsed =
      (status.ended || Date.now() / 1000) -
      (status.started || status.created || Date.now() / 1000);
    (
      this.node.querySelector('.nbtrain-panel-progress') as HTMLElement
    ).textContent =
      `step ${step}${detail.total ? '/' + detail.total : ''} · loss ${formatNumber(losses.length ? losses[losses.length - 1][1] : null)}` +
      ` · ${detail.run.nproc ?? '?'} processes · elapsed ${formatDuration(elapsed)} · ${detail.id}`;
    showPhase(
      this.node.querySelector('.nbtrain-phase') as HTMLElement,
      detail.phase
    );
    const errors = Object.values(detail.errors)
      .map(e => `${e.type}: ${e.message}`)
      .join('\n');
    (
      this.node.querySelector('.nbtrain-panel-reason') as HTMLElement
    ).textContent = [status.reason, errors].filter(Boolean).join('\n');

    const trans = this.trans;
    const data = { emptyText: trans.__('no data yet') };
    const live = {
      emptyText: final
        ? trans.__('sampled only while the run is live')
        : data.emptyText,
      xFormat: formatSeconds,
      xFromZero: true,
      yFromZero: true
    };
    // tokens/s is ~100x samples/s: each gets its own scale, or samples/s lies flat at the bottom
    const tokens = this.series('tokens_per_s').map(s => ({
      ...s,
      rightAxis: true
    }));
    const charts: HTMLElement[] = [
      lineChart(
        trans.__('Loss'),
        [...this.series('loss'), ...this.series('eval_loss')],
        data
      ),
      lineChart(trans.__('Learning rate'), this.series('lr'), data),
      lineChart(
        trans.__('Throughput (per s)'),
        [...this.series('samples_per_s'), ...tokens],
        data
      ),
      lineChart(
        trans.__('CPU % per rank (100 = one core), since this panel opened'),
        usage(this.cpu),
        live
      ),
      lineChart(
        trans.__('Resident memory MiB per rank, since this panel opened'),
        usage(this.rss),
        live
      )
    ];
    const extra = new Set<string>();
    this.rows.forEach(row =>
      Object.keys(row).forEach(
        k => !KNOWN.has(k) && typeof row[k] === 'number' && extra.add(k)
      )
    );
    [...extra]
      .sort()
      .slice(0, 6)
      .forEach(k => charts.push(lineChart(k, this.series(k, 'all'), data)));
    (this.node.querySelector('.nbtrain-charts') as HTMLElement).replaceChildren(
      ...charts
    );

    (
      this.node.querySelector('.nbtrain-panel-workers') as HTMLElement
    ).textContent = detail.workers
      .map(
        w =>
          `rank ${w.rank}: pid ${w.pid} ${w.alive ? `running · CPU ${(w.cpu_percent ?? 0).toFixed(0)}% · ${formatBytes(w.rss_bytes)}` : 'gone'}`
      )
      .join('   ');
    const config = detail.effective?.config
      ? { ...detail.effective, note: 'as the engine was initialised' }
      : {
          planned: detail.deepspeed,
          note: final
            ? 'planned; the engine never recorded its own config'
            : 'planned; the engine has not started yet'
        };
    (
      this.node.querySelector('.nbtrain-config pre') as HTMLElement
    ).textContent = JSON.stringify(config, null, 2);
    (this.node.querySelector('.nbtrain-cell pre') as HTMLElement).textContent =
      detail.cell;
    const select = this.node.querySelector(
      '.nbtrain-log select'
    ) as HTMLSelectElement;
    const ranks = Array.from(
      { length: Number(detail.run.nproc || 1) },
      (_, i) => i
    );
    if (select.options.length !== ranks.length) {
      select.replaceChildren(
        ...ranks.map(r => new Option(`rank ${r}`, String(r)))
      );
    }
    const pre = this.node.querySelector('.nbtrain-log pre') as HTMLElement;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = log.join('\n');
    if (atBottom) {
      pre.scrollTop = pre.scrollHeight;
    }
  }

  private cursor = '';
  private rows = new Map<string, IMetricRecord>();
  private cpu: { [rank: number]: [number, number][] } = {};
  private rss: { [rank: number]: [number, number][] } = {};
  private timer = 0;
  private final = false;
}

function usage(byRank: { [rank: number]: [number, number][] }): ISeries[] {
  return Object.entries(byRank).map(([rank, points]) => ({
    label: `rank ${rank}`,
    points: rebase(points)
  }));
}

/** Seconds since the first sample, so the x axis reads as time into the panel's watch. */
function rebase(points: [number, number][]): [number, number][] {
  const t0 = points.length ? points[0][0] : 0;
  return points.map(([t, v]) => [t - t0, v]);
}
