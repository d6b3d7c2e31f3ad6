// The start-up phase of a run (nbtrain/rundir/progress.py computes it; the server sends it as `phase`).
import { IPhase } from './api';

/** Show what a starting run is doing, and the phases it is done with, in `node`; hide it once the run trains. */
export function showPhase(
  node: HTMLElement,
  phase: IPhase | null | undefined
): void {
  const text = phase ? `starting: ${phase.line}` : '';
  const done = phase && phase.trail ? `done: ${phase.trail}` : '';
  node.style.display = phase ? '' : 'none';
  if (node.textContent !== text + done) {
    node.replaceChildren(
      text,
      ...(done
        ? [
            Object.assign(document.createElement('small'), {
              textContent: done
            })
          ]
        : [])
    );
  }
}
