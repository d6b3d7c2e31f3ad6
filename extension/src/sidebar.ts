// The "BigTrain" sidebar: machine utilization, then every run with its progress and a Stop button.
import { showErrorMessage } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { api, formatBytes, formatDuration, formatNumber, IMachine, IRunSummary } from './api';
import { sparkline } from './chart';
import { RunsModel } from './model';

export class RunsSidebar extends Widget {
  constructor(private model: RunsModel, private openRun: (id: string) => void) {
    super();
    this.id = 'nbtrain-sidebar';
    this.addClass('nbtrain-sidebar');
    this.title.caption = 'BigTrain runs';
    this.node.innerHTML = '<div class="nbtrain-sidebar-title">BigTrain</div>'
      + '<div class="nbtrain-machine"></div><div class="nbtrain-error"></div><ul class="nbtrain-runs"></ul>';
    model.changed.connect(this.render, this);
  }

  render(): void {
    this.renderMachine(this.model.machine);
    (this.node.querySelector('.nbtrain-error') as HTMLElement).textContent = this.model.error;
    const list = this.node.querySelector('.nbtrain-runs') as HTMLElement;
    list.replaceChildren(...this.model.runs.runs.map(run => this.renderRun(run)));
    if (this.model.runs.runs.length === 0) {
      const empty = document.createElement('li');
      empty.className = 'nbtrain-empty';
      empty.textContent = `No runs yet. Runs of %%bigtrain cells appear here (searched in: ${this.model.runs.roots.join(', ')}).`;
      list.appendChild(empty);
    }
  }

  private renderMachine(machine: IMachine | null): void {
    const box = this.node.querySelector('.nbtrain-machine') as HTMLElement;
    if (!machine) {
      box.textContent = '';
      return;
    }
    const rows = machine.gpus.map(g => meter(`GPU${g.index}`, g.utilization_percent,
      `${g.utilization_percent.toFixed(0)}% · ${formatBytes(g.memory_used_bytes)} / ${formatBytes(g.memory_total_bytes)}`));
    rows.push(meter('CPU', machine.cpu_percent, `${machine.cpu_percent.toFixed(0)}% of ${machine.cpu_count} cores`));
    rows.push(meter('RAM', machine.memory_percent,
      `${formatBytes(machine.memory_used_bytes)} / ${formatBytes(machine.memory_total_bytes)}`));
    box.replaceChildren(...rows);
  }

  private renderRun(run: IRunSummary): HTMLElement {
    const item = document.createElement('li');
    item.className = `nbtrain-run nbtrain-state-${run.state}`;
    item.dataset.runId = run.id;
    item.title = `${run.id}\n${run.root}${run.reason ? '\n' + run.reason : ''}`;
    const steps = run.total ? `${run.step}/${run.total}` : `${run.step}`;
    item.innerHTML = '<div class="nbtrain-run-line"><span class="nbtrain-run-name"></span>'
      + '<span class="nbtrain-badge"></span></div><div class="nbtrain-run-line nbtrain-run-numbers">'
      + '<span class="nbtrain-run-step"></span><span class="nbtrain-run-loss"></span><span class="nbtrain-run-spark"></span></div>'
      + '<div class="nbtrain-run-line nbtrain-run-usage"></div>';
    (item.querySelector('.nbtrain-run-name') as HTMLElement).textContent = run.name || run.id;
    (item.querySelector('.nbtrain-badge') as HTMLElement).textContent = run.state;
    (item.querySelector('.nbtrain-run-step') as HTMLElement).textContent = `step ${steps}`;
    (item.querySelector('.nbtrain-run-loss') as HTMLElement).textContent = `loss ${formatNumber(run.loss)}`;
    item.querySelector('.nbtrain-run-spark')!.appendChild(sparkline(run.loss_tail));
    const usage = item.querySelector('.nbtrain-run-usage') as HTMLElement;
    if (!run.final) {
      usage.textContent = `${run.workers_alive ?? 0} workers · CPU ${(run.cpu_percent ?? 0).toFixed(0)}% · `
        + `${formatBytes(run.rss_bytes)} · ETA ${formatDuration(run.eta_s)}`;
      const stop = document.createElement('button');
      stop.className = 'jp-mod-styled jp-mod-warn nbtrain-stop';
      stop.textContent = 'Stop';
      stop.title = 'Stop this run: its workers get SIGTERM, then SIGKILL';
      stop.onclick = event => {
        event.stopPropagation();
        stop.disabled = true;
        stop.textContent = 'Stopping…';
        api.stop(run.id)
          .catch(e => showErrorMessage('Could not stop the run', (e as Error).message))
          .finally(() => this.model.refresh());
      };
      usage.appendChild(stop);
    } else {
      usage.textContent = run.reason;
    }
    item.onclick = () => this.openRun(run.id);
    return item;
  }
}

function meter(label: string, percent: number, text: string): HTMLElement {
  const row = document.createElement('div');
  row.className = 'nbtrain-meter';
  row.innerHTML = '<span class="nbtrain-meter-label"></span><span class="nbtrain-meter-bar"><i></i></span>'
    + '<span class="nbtrain-meter-text"></span>';
  (row.querySelector('.nbtrain-meter-label') as HTMLElement).textContent = label;
  (row.querySelector('i') as HTMLElement).style.width = `${Math.max(0, Math.min(100, percent))}%`;
  (row.querySelector('.nbtrain-meter-text') as HTMLElement).textContent = text;
  return row;
}
