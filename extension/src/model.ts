// One poller of the runs list and machine utilization, shared by the sidebar and the status bar.
import { ISignal, Signal } from '@lumino/signaling';

import { api, IMachine, IRunsList } from './api';

const LIVE_MS = 1000; // while a run is live: the sidebar should feel live
const IDLE_MS = 3000;

export class RunsModel {
  runs: IRunsList = { roots: [], runs: [] };
  machine: IMachine | null = null;
  error = '';

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
      const live = this.runs.runs.some(r => !r.final);
      this._timer = window.setTimeout(() => void this._poll(), live ? LIVE_MS : IDLE_MS);
    }
  }

  private _changed = new Signal<this, void>(this);
  private _timer = 0;
  private _disposed = false;
}
