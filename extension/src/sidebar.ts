// The "BigTrain" sidebar: machine utilization, then every run with its progress and a Stop button.
import { showErrorMessage } from '@jupyterlab/apputils';
import { TranslationBundle } from '@jupyterlab/translation';
import { Widget } from '@lumino/widgets';

import { api, IMachine, IRunSummary } from './api';
import { formatBytes, formatDuration, formatNumber } from './format';
import { sparkline } from './chart';
import { RunsModel } from './model';
import { showPhase } from './phase';

export class RunsSidebar extends Widget {
  constructor(
    private model: RunsModel,
    private openRun: (id: string) => void,
    private trans: TranslationBundle
  ) {
    super();
    this.id = 'nbtrain-sidebar';
    this.addClass('nbtrain-sidebar');
    this.title.caption = trans.__('BigTrain runs');
    this.node.innerHTML =
      '<div class="nbtrain-sidebar-title">BigTrain</div>' +
      '<div class="nbtrain-machine"></div><div class="nbtrain-error"></div><ul class="nbtrain-runs"></ul>';
    model.changed.connect(this.render, this);
  }

  render(): void {
    this.renderMachine(this.model.machine);
    (this.node.querySelector('.nbtrain-error') as HTMLElement).textContent =
      this.model.error;
    const list = this.node.querySelector('.nbtrain-runs') as HTMLElement;
    const runs = this.model.runs.runs;
    // Update rows in place: a row (and its Stop button) replaced under the pointer loses clicks.
    const rows = runs.map(run => {
      const row = this.rows.get(run.id) || this.createRow(run.id);
      this.rows.set(run.id, row);
      this.updateRow(row, run);
      return row;
    });
    const listed = new Set(runs.map(r => r.id));
    for (const id of [...this.rows.keys()].filter(id => !listed.has(id))) {
      this.rows.delete(id);
    }
    if (rows.length === 0) {
      const empty = document.createElement('li');
      empty.className = 'nbtrain-empty';
      empty.textContent = `No runs yet. Runs of %%bigtrain cells appear here (searched in: ${this.model.runs.roots.join(', ')}).`;
      rows.push(empty);
    }
    const current = [...list.children];
    if (
      current.length !== rows.length ||
      current.some((node, i) => node !== rows[i])
    ) {
      list.replaceChildren(...rows);
    }
  }

  private renderMachine(machine: IMachine | null): void {
    const box = this.node.querySelector('.nbtrain-machine') as HTMLElement;
    if (!machine) {
      box.textContent = '';
      return;
    }
    const rows = machine.gpus.map(g =>
      meter(
        `GPU${g.index}`,
        g.utilization_percent,
        `${g.utilization_percent.toFixed(0)}% · ${formatBytes(g.memory_used_bytes)} / ${formatBytes(g.memory_total_bytes)}`
      )
    );
    rows.push(
      meter(
        'CPU',
        machine.cpu_percent,
        `${machine.cpu_percent.toFixed(0)}% of ${machine.cpu_count} cores`
      )
    );
    rows.push(
      meter(
        'RAM',
        machine.memory_percent,
        `${formatBytes(machine.memory_used_bytes)} / ${formatBytes(machine.memory_total_bytes)}`
      )
    );
    box.replaceChildren(...rows);
  }

  private createRow(id: string): HTMLElement {
    const item = document.createElement('li');
    item.dataset.runId = id;
    item.innerHTML =
      '<div class="nbtrain-run-line"><span class="nbtrain-run-name"></span>' +
      '<span class="nbtrain-badge"></span></div><div class="nbtrain-run-line nbtrain-run-numbers">' +
      '<span class="nbtrain-run-step"></span><span class="nbtrain-run-loss"></span><span class="nbtrain-run-spark"></span></div>' +
      '<div class="nbtrain-phase"></div>' +
      '<div class="nbtrain-run-line"><span class="nbtrain-run-usage"></span>' +
      '<button class="jp-mod-styled jp-mod-warn nbtrain-stop">Stop</button></div>';
    const stop = item.querySelector('.nbtrain-stop') as HTMLButtonElement;
    stop.title = this.trans.__(
      'Stop this run: its workers get SIGTERM, then SIGKILL'
    );
    stop.onclick = event => {
      event.stopPropagation();
      stop.disabled = true;
      stop.textContent = this.trans.__('Stopping…');
      api
        .stop(id)
        .catch(e =>
          showErrorMessage(
            this.trans.__('Could not stop the run'),
            (e as Error).message
          )
        )
        .finally(() => this.model.refresh());
    };
    item.onclick = () => this.openRun(id);
    return item;
  }

  private updateRow(item: HTMLElement, run: IRunSummary): void {
    item.className = `nbtrain-run nbtrain-state-${run.state}`;
    item.title = `${run.id}\n${run.root}${run.reason ? '\n' + run.reason : ''}`;
    const steps = run.total ? `${run.step}/${run.total}` : `${run.step}`;
    setText(item, '.nbtrain-run-name', run.name || run.id);
    setText(item, '.nbtrain-badge', run.state);
    setText(item, '.nbtrain-run-step', `step ${steps}`);
    setText(item, '.nbtrain-run-loss', `loss ${formatNumber(run.loss)}`);
    item
      .querySelector('.nbtrain-run-spark')!
      .replaceChildren(sparkline(run.loss_tail));
    showPhase(item.querySelector('.nbtrain-phase') as HTMLElement, run.phase);
    setText(
      item,
      '.nbtrain-run-usage',
      run.final
        ? run.reason
        : `${run.workers_alive ?? 0} workers · CPU ${(run.cpu_percent ?? 0).toFixed(0)}% · ` +
            `${formatBytes(run.rss_bytes)} · ETA ${formatDuration(run.eta_s)}`
    );
    if (run.final) {
      item.querySelector('.nbtrain-stop')?.remove();
    }
  }

  private rows = new Map<string, HTMLElement>();
}

function setText(root: HTMLElement, selector: string, text: string): void {
  const node = root.querySelector(selector) as HTMLElement | null;
  if (node && node.textContent !== text) {
    node.textContent = text;
  }
}

function meter(label: string, percent: number, text: string): HTMLElement {
  const row = document.createElement('div');
  row.className = 'nbtrain-meter';
  row.innerHTML =
    '<span class="nbtrain-meter-label"></span><span class="nbtrain-meter-bar"><i></i></span>' +
    '<span class="nbtrain-meter-text"></span>';
  (row.querySelector('.nbtrain-meter-label') as HTMLElement).textContent =
    label;
  (row.querySelector('i') as HTMLElement).style.width =
    `${Math.max(0, Math.min(100, percent))}%`;
  (row.querySelector('.nbtrain-meter-text') as HTMLElement).textContent = text;
  return row;
}
