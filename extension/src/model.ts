// One poller of the runs list and machine utilization, shared by the sidebar and the status bar.
import { ISignal, Signal } from '@lumino/signaling';

import { api, IMachine, IRunsList } from './api';
import { DEFAULT_INTERVALS, IIntervals } from './intervals';

export class RunsModel {
  runs: IRunsList = { roots: [], runs: [] };
  machine: IMachine | null = null;
  error = '';

  /** The polling periods (the extension's settings); a change applies at once. */
  get intervals(): IIntervals {
    return this._intervals;
  }

  set intervals(value: IIntervals) {
    this._intervals = value;
    if (!this._disposed) {
      this.refresh();
    }
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Start polling (again) at once. */
  refresh(): void {
    window.clearTimeout(this._timer);
    void this._poll();
  }

  dispose(): void {
    window.clearTimeout(this._timer);
    this._disposed = true;
  }

  private async _poll(): Promise<void> {
    try {
      const [runs, machine] = await Promise.all([api.runs(), api.machine()]);
      this.runs = runs;
      this.machine = machine;
      this.error = '';
    } catch (e) {
      this.error = (e as Error).message;
    }
    this._changed.emit();
    if (!this._disposed) {
      // A refresh() while this poll was waiting started another: keep one timer, not two loops.
      window.clearTimeout(this._timer);
      const live = this.runs.runs.some(r => !r.final);
      this._timer = window.setTimeout(
        () => void this._poll(),
        live ? this._intervals.live : this._intervals.idle
      );
    }
  }

  private _intervals = DEFAULT_INTERVALS;
  private _changed = new Signal<this, void>(this);
  private _timer = 0;
  private _disposed = false;
}
