// Notebook commands: insert a %%bigtrain cell, open the config panel, open a tutorial.
import { JupyterFrontEnd } from '@jupyterlab/application';
import { InputDialog, showErrorMessage } from '@jupyterlab/apputils';
import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import {
  INotebookTracker,
  NotebookActions,
  NotebookPanel
} from '@jupyterlab/notebook';
import { TranslationBundle } from '@jupyterlab/translation';

import { api } from './api';

export const LOAD_CELL = '%load_ext nbtrain';
/** The cell magic's name: code, not text to translate. */
export const MAGIC = '%%bigtrain';

/** What a command that takes no arguments says of them (the command palette's schema). */
export const NO_ARGS = {
  args: { type: 'object' as const, properties: {} }
};

/** The template of "Insert %%bigtrain cell": the common flags, and the loop in one call. */
export const BIGTRAIN_TEMPLATE = `%%bigtrain --nproc 2 --zero 2 --precision fp32 --micro-batch 8 --steps 100 --lr 1e-3 --name my-run
# Runs on every rank; \`bigtrain\` is the run context. make_model, train_data and loss_fn come from earlier cells.
result = bigtrain.fit(make_model(), train_data, loss_fn=loss_fn)
print(f"final loss {result.final_loss:.4f}")`;

export const CONFIG_PANEL_CELL = `from nbtrain import ConfigPanel

panel = ConfigPanel()  # then: %%bigtrain --config panel
panel`;

/** Return the current notebook, opening a new one when none is open. */
async function currentNotebook(
  app: JupyterFrontEnd,
  tracker: INotebookTracker
): Promise<NotebookPanel> {
  if (tracker.currentWidget) {
    return tracker.currentWidget;
  }
  const panel = (await app.commands.execute('notebook:create-new', {
    kernelName: 'python3'
  })) as NotebookPanel;
  await panel.context.ready;
  return panel;
}

function hasLoadExt(panel: NotebookPanel): boolean {
  const cells = panel.content.model?.sharedModel.cells || [];
  return cells.some(cell => cell.getSource().includes(LOAD_CELL));
}

/** Insert code cells below the active cell (replacing it when it is an empty first cell). */
function insertCells(panel: NotebookPanel, sources: string[]): void {
  const notebook = panel.content;
  for (const source of sources) {
    const active = notebook.activeCell;
    const reuse =
      active &&
      active.model.type === 'code' &&
      active.model.sharedModel.getSource().trim() === '';
    if (!reuse) {
      NotebookActions.insertBelow(notebook);
    }
    NotebookActions.changeCellType(notebook, 'code');
    notebook.activeCell!.model.sharedModel.setSource(source);
  }
}

/** Open `path` as the front end does: a tab of JupyterLab, or Notebook 7's own browser tab. */
async function openDocument(app: JupyterFrontEnd, path: string): Promise<void> {
  if (PageConfig.getOption('notebookPage')) {
    // Notebook 7 shows one document per page; its docmanager:open built a notebook on this page
    // only to drop it ("Cannot read properties of null (reading 'updateRenderOption')").
    window.open(
      URLExt.join(
        ServerConnection.makeSettings().baseUrl,
        'notebooks',
        URLExt.encodeParts(path)
      ),
      '_blank'
    );
    return;
  }
  await app.commands.execute('docmanager:open', { path });
}

export function registerNotebookCommands(
  app: JupyterFrontEnd,
  tracker: INotebookTracker,
  trans: TranslationBundle
): void {
  // The two commands that work on the current notebook (a new one when none is open).
  const addNotebookCommand = (
    id: string,
    label: string,
    caption: string,
    run: (panel: NotebookPanel) => Promise<void>
  ): void => {
    app.commands.addCommand(id, {
      describedBy: NO_ARGS,
      label,
      caption,
      execute: async () => run(await currentNotebook(app, tracker))
    });
  };
  addNotebookCommand(
    'nbtrain:insert-cell',
    // The magic goes in as an argument: gettext's formatting turns a literal %% into %.
    trans.__('Insert %1 cell', MAGIC),
    trans.__(
      'Insert a %1 cell with the common flags (and %2 where it is missing)',
      MAGIC,
      LOAD_CELL
    ),
    async panel => {
      insertCells(
        panel,
        hasLoadExt(panel) ? [BIGTRAIN_TEMPLATE] : [LOAD_CELL, BIGTRAIN_TEMPLATE]
      );
      panel.content.activate();
    }
  );
  addNotebookCommand(
    'nbtrain:open-config',
    trans.__('Open config panel'),
    trans.__(
      'Insert and run a cell showing nbtrain.ConfigPanel: DeepSpeed settings with live validation'
    ),
    async panel => {
      insertCells(panel, [CONFIG_PANEL_CELL]);
      await panel.sessionContext.ready;
      await NotebookActions.run(panel.content, panel.sessionContext);
    }
  );
  app.commands.addCommand('nbtrain:open-tutorial', {
    describedBy: NO_ARGS,
    label: trans.__('Open tutorial…'),
    caption: trans.__(
      "Copy one of nbtrain's tutorial notebooks into the workspace and open it"
    ),
    execute: async () => {
      try {
        const { tutorials } = await api.tutorials();
        if (!tutorials.length) {
          await showErrorMessage(
            trans.__('No tutorials'),
            trans.__(
              'No nbtrain tutorial notebooks are installed on the server.'
            )
          );
          return;
        }
        const labels = tutorials.map(t => `${t.title} (${t.name})`);
        const choice = await InputDialog.getItem({
          title: trans.__('Open an nbtrain tutorial'),
          items: labels,
          current: 0
        });
        if (!choice.button.accept || choice.value === null) {
          return;
        }
        const tutorial = tutorials[labels.indexOf(choice.value)];
        const { path } = await api.copyTutorial(tutorial.name);
        await openDocument(app, path);
      } catch (e) {
        await showErrorMessage(
          trans.__('Could not open the tutorial'),
          (e as Error).message
        );
      }
    }
  });
}
