// Typed calls to the BigTrain server API (nbtrain/server/handlers.py).
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { callAPI } from './request';

/** Where a starting run is (nbtrain/rundir/progress.py: Startup.as_json); null once it trains or ended. */
export interface IPhase {
  key: string; // workers, imports, process_group, cell, op, engine or first_step
  label: string; // e.g. "building DeepSpeed op cpu_adam (once for this environment: later runs reuse it)"
  line: string; // label, time in this phase and since the run started
  phase_s: number;
  elapsed_s: number;
  trail: string; // the phases done with their durations
  done: { key: string; label: string; seconds: number }[];
}

export interface IRunSummary {
  id: string;
  name: string;
  root: string;
  state: string;
  reason: string;
  final: boolean;
  created: number | null;
  started: number | null;
  ended: number | null;
  nproc: number | null;
  step: number;
  total: number | null;
  loss: number | string | null; // 'NaN' when the loss diverged
  loss_tail: [number, number | string][];
  eta_s: number | null;
  phase: IPhase | null;
  workers_alive?: number;
  cpu_percent?: number;
  rss_bytes?: number;
}

export interface IRunsList {
  roots: string[];
  runs: IRunSummary[];
}

export interface IWorker {
  rank: number;
  pid: number;
  alive: boolean;
  cpu_percent?: number;
  rss_bytes?: number;
}

export interface IRunDetail {
  id: string;
  root: string;
  status: { [key: string]: any };
  run: { [key: string]: any };
  deepspeed: { [key: string]: any } | null;
  effective: {
    config?: { [key: string]: any };
    engine?: { [key: string]: any };
  } | null;
  cell: string;
  errors: {
    [rank: string]: { type: string; message: string; traceback: string };
  };
  ranks: number[];
  total: number | null;
  phase: IPhase | null;
  workers: IWorker[];
}

export interface IMetricRecord {
  step: number;
  rank: number;
  time: number;
  [key: string]: number | null;
}

export interface IMetrics {
  id: string;
  state: string;
  records: IMetricRecord[];
  cursor: string;
}

export interface IGpu {
  index: number;
  name: string;
  utilization_percent: number;
  memory_used_bytes: number;
  memory_total_bytes: number;
}

export interface IMachine {
  cpu_percent: number;
  cpu_count: number;
  memory_used_bytes: number;
  memory_total_bytes: number;
  memory_percent: number;
  gpus: IGpu[];
}

export interface ILogTail {
  rank: number;
  lines: string[];
  exists: boolean;
}

export interface ITutorial {
  name: string;
  title: string;
}

/** Call the API at `path` under nbtrain/api; throw an Error carrying what the user should read. */
export function requestAPI<T>(
  path: string,
  init: RequestInit = {}
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'nbtrain', 'api', path);
  return callAPI<T>(path, () =>
    ServerConnection.makeRequest(url, init, settings)
  );
}

export const api = {
  runs: () => requestAPI<IRunsList>('runs'),
  run: (id: string) => requestAPI<IRunDetail>(`runs/${encodeURIComponent(id)}`),
  metrics: (id: string, cursor: string) =>
    requestAPI<IMetrics>(
      `runs/${encodeURIComponent(id)}/metrics?cursor=${encodeURIComponent(cursor)}`
    ),
  log: (id: string, rank: number, lines = 200) =>
    requestAPI<ILogTail>(
      `runs/${encodeURIComponent(id)}/log?rank=${rank}&lines=${lines}`
    ),
  stop: (id: string) =>
    requestAPI<{ status: any }>(`runs/${encodeURIComponent(id)}/stop`, {
      method: 'POST',
      body: '{}'
    }),
  machine: () => requestAPI<IMachine>('machine'),
  tutorials: () => requestAPI<{ tutorials: ITutorial[] }>('tutorials'),
  copyTutorial: (name: string) =>
    requestAPI<{ path: string }>(`tutorials/${encodeURIComponent(name)}`, {
      method: 'POST',
      body: '{}'
    })
};
