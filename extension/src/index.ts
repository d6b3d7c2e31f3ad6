// nbtrain's JupyterLab extension: the BigTrain sidebar, run panels, status item, commands, launcher cards.
import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  MainAreaWidget,
  ToolbarButton,
  WidgetTracker
} from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { ILauncher } from '@jupyterlab/launcher';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { ITranslator, nullTranslator } from '@jupyterlab/translation';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { DisposableDelegate } from '@lumino/disposable';

// The commands (their labels and menu entries), the sidebar and the status item exist from
// JupyterLab's start: activation needs these three modules at once.
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { MAGIC, NO_ARGS, registerNotebookCommands } from './commands';
import { intervalsFromSettings } from './intervals';
import { RunsModel } from './model';
import type { RunPanel } from './runpanel';
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { RunsSidebar } from './sidebar';
// eslint-disable-next-line jupyter/prefer-lazy-imports
import { RunStatusItem } from './statusbar';

const ICON_SVG =
  '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
  '<path d="M3 20h18v2H3z"/><path d="M4 17l5-6 4 3 6-9 1.6 1.2-7.2 10.6-4-3-3.9 4.5z"/></g></svg>';
const bigtrainIcon = new LabIcon({
  name: 'nbtrain:bigtrain',
  svgstr: ICON_SVG
});

const PLUGIN_ID = 'nbtrain:plugin'; // its settings: schema/plugin.json

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'BigTrain sidebar, run panels and commands for %%bigtrain runs',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [
    ICommandPalette,
    ILauncher,
    IStatusBar,
    ILayoutRestorer,
    ISettingRegistry,
    ITranslator
  ],
  activate: (
    app: JupyterFrontEnd,
    notebooks: INotebookTracker,
    palette: ICommandPalette | null,
    launcher: ILauncher | null,
    statusBar: IStatusBar | null,
    restorer: ILayoutRestorer | null,
    settingRegistry: ISettingRegistry | null,
    translator: ITranslator | null
  ) => {
    const trans = (translator ?? nullTranslator).load('nbtrain');
    // The launcher groups cards by the translated category: JupyterLab's own word for Notebook.
    const notebookCategory = (translator ?? nullTranslator)
      .load('jupyterlab')
      .__('Notebook');
    const model = new RunsModel();
    const notebook7Page = PageConfig.getOption('notebookPage'); // 'tree', 'notebooks', …; empty in JupyterLab
    const panels = new WidgetTracker<MainAreaWidget<RunPanel>>({
      namespace: 'nbtrain-run'
    });

    const openRun = async (id: string): Promise<void> => {
      // The panel and its charts load when a run is first opened, not at JupyterLab's start.
      const { RunPanel } = await import('./runpanel');
      const open = panels.find(w => w.content.runId === id);
      if (open) {
        app.shell.activateById(open.id);
        return;
      }
      const widget = new MainAreaWidget({
        content: new RunPanel(id, () => model.intervals.runPanel, trans)
      });
      widget.id = `nbtrain-run-${id}`;
      widget.title.icon = bigtrainIcon;
      widget.title.label = id;
      widget.title.closable = true;
      void panels.add(widget);
      // Notebook 7's main area holds the page's one document (it drops a second widget): there
      // the run opens in the right-hand side panel.
      app.shell.add(widget, notebook7Page ? 'right' : 'main');
      app.shell.activateById(widget.id);
    };

    const sidebar = new RunsSidebar(model, openRun, trans);
    sidebar.title.icon = bigtrainIcon;
    app.shell.add(sidebar, 'left', { rank: 600 });
    restorer?.add(sidebar, 'nbtrain-sidebar');

    app.commands.addCommand('nbtrain:open-run', {
      describedBy: {
        args: {
          type: 'object',
          properties: {
            id: { type: 'string', description: 'The run id (its folder name)' }
          },
          required: ['id']
        }
      },
      label: args => trans.__('Open BigTrain run %1', String(args.id ?? '')),
      execute: args => openRun(String(args.id))
    });
    app.commands.addCommand('nbtrain:show-runs', {
      describedBy: NO_ARGS,
      label: trans.__('Show BigTrain runs'),
      icon: bigtrainIcon,
      execute: () => app.shell.activateById(sidebar.id)
    });
    registerNotebookCommands(app, notebooks, trans);
    restorer?.restore(panels, {
      command: 'nbtrain:open-run',
      args: w => ({ id: w.content.runId }),
      name: w => w.content.runId
    });

    for (const command of [
      'nbtrain:insert-cell',
      'nbtrain:open-config',
      'nbtrain:open-tutorial',
      'nbtrain:show-runs'
    ]) {
      palette?.addItem({ command, category: trans.__('BigTrain') });
    }
    app.contextMenu.addItem({
      command: 'nbtrain:insert-cell',
      selector: '.jp-Notebook',
      rank: 20
    });
    app.contextMenu.addItem({
      command: 'nbtrain:open-config',
      selector: '.jp-Notebook',
      rank: 21
    });
    launcher?.add({
      command: 'nbtrain:open-tutorial',
      category: notebookCategory,
      rank: 90
    });
    app.commands.addCommand('nbtrain:new-notebook', {
      describedBy: NO_ARGS,
      label: trans.__('BigTrain notebook'),
      caption: trans.__(
        'A new notebook with nbtrain loaded and a %1 cell',
        MAGIC
      ),
      icon: bigtrainIcon,
      execute: async () => {
        const panel = (await app.commands.execute('notebook:create-new', {
          kernelName: 'python3'
        })) as NotebookPanel;
        await panel.context.ready;
        if (notebooks.currentWidget !== panel) {
          app.shell.activateById(panel.id);
        }
        await app.commands.execute('nbtrain:insert-cell');
      }
    });
    launcher?.add({
      command: 'nbtrain:new-notebook',
      category: notebookCategory,
      rank: 89
    });

    // A toolbar button on every notebook; not on Notebook 7's pages without notebooks (tree, edit,
    // consoles): a widget extension registered there makes its document manager reload its settings
    // while they load, which fails ("Cannot convert undefined or null to object" in the console).
    if (!notebook7Page || notebook7Page === 'notebooks') {
      app.docRegistry.addWidgetExtension('Notebook', {
        createNew: (panel: NotebookPanel) => {
          const button = new ToolbarButton({
            icon: bigtrainIcon,
            label: MAGIC,
            tooltip: trans.__('Insert %1 cell', MAGIC),
            onClick: () => void app.commands.execute('nbtrain:insert-cell')
          });
          panel.toolbar.insertItem(10, 'nbtrain-insert', button);
          return new DisposableDelegate(() => button.dispose());
        }
      });
    }

    if (statusBar) {
      const item = new RunStatusItem(model, openRun);
      statusBar.registerStatusItem('nbtrain:status', {
        item,
        align: 'left',
        rank: 50,
        isActive: () => model.runs.runs.some(r => !r.final),
        activeStateChanged: model.changed
      });
    }
    model.refresh();
    // The polling periods come from the settings, and follow their changes (Settings Editor).
    settingRegistry?.load(PLUGIN_ID).then(
      settings => {
        const apply = () => {
          model.intervals = intervalsFromSettings(settings.composite);
          // Open run panels poll at once, then at the new period (not after the old one).
          panels.forEach(widget => void widget.content.poll());
        };
        apply();
        settings.changed.connect(apply);
      },
      reason =>
        console.error(
          'nbtrain: could not load its settings; polling at the defaults',
          reason
        )
    );
  }
};

export default plugin;
