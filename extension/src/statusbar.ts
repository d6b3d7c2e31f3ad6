// The status-bar item: the newest live run's start-up phase, then its step, loss and ETA; a click opens its panel.
import { Widget } from '@lumino/widgets';

import { formatDuration, formatNumber } from './format';
import { RunsModel } from './model';

export class RunStatusItem extends Widget {
  constructor(
    private model: RunsModel,
    private openRun: (id: string) => void
  ) {
    super();
    this.addClass('nbtrain-status');
    model.changed.connect(this.render, this);
    this.node.onclick = () => {
      if (this.runId) {
        this.openRun(this.runId);
      }
    };
  }

  render(): void {
    const run = this.model.runs.runs.find(r => !r.final);
    this.runId = run ? run.id : '';
    if (!run) {
      this.node.textContent = '';
      this.node.title = '';
      return;
    }
    const steps = run.total ? `${run.step}/${run.total}` : `${run.step}`;
    this.node.textContent = run.phase
      ? `BigTrain ${run.name || run.id}: starting · ${run.phase.line}`
      : `BigTrain ${run.name || run.id}: step ${steps} · loss ${formatNumber(run.loss)} · ETA ${formatDuration(run.eta_s)}`;
    this.node.title = `${run.id} (${run.state}); click to open its panel`;
  }

  private runId = '';
}
