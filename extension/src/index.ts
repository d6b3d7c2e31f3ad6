// nbtrain's JupyterLab extension: the BigTrain sidebar, run panels, status item, commands, launcher cards.
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, ToolbarButton, WidgetTracker } from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { ILauncher } from '@jupyterlab/launcher';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { DisposableDelegate } from '@lumino/disposable';

import { registerNotebookCommands } from './commands';
import { RunsModel } from './model';
import { RunPanel } from './runpanel';
import { RunsSidebar } from './sidebar';
import { RunStatusItem } from './statusbar';

const ICON_SVG = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">'
  + '<path d="M3 20h18v2H3z"/><path d="M4 17l5-6 4 3 6-9 1.6 1.2-7.2 10.6-4-3-3.9 4.5z"/></g></svg>';
const bigtrainIcon = new LabIcon({ name: 'nbtrain:bigtrain', svgstr: ICON_SVG });
const CATEGORY = 'BigTrain';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'nbtrain:plugin',
  description: 'BigTrain sidebar, run panels and commands for %%bigtrain runs',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette, ILauncher, IStatusBar, ILayoutRestorer],
  activate: (app: JupyterFrontEnd, notebooks: INotebookTracker, palette: ICommandPalette | null,
             launcher: ILauncher | null, statusBar: IStatusBar | null, restorer: ILayoutRestorer | null) => {
    const model = new RunsModel();
    const notebook7Page = PageConfig.getOption('notebookPage');  // 'tree', 'notebooks', …; empty in JupyterLab
    const panels = new WidgetTracker<MainAreaWidget<RunPanel>>({ namespace: 'nbtrain-run' });

    const openRun = (id: string) => {
      const open = panels.find(w => w.content.runId === id);
      if (open) {
        app.shell.activateById(open.id);
        return;
      }
      const widget = new MainAreaWidget({ content: new RunPanel(id) });
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

    const sidebar = new RunsSidebar(model, openRun);
    sidebar.title.icon = bigtrainIcon;
    app.shell.add(sidebar, 'left', { rank: 600 });
    restorer?.add(sidebar, 'nbtrain-sidebar');

    app.commands.addCommand('nbtrain:open-run', {
      label: args => `Open BigTrain run ${args.id ?? ''}`,
      execute: args => openRun(String(args.id))
    });
    app.commands.addCommand('nbtrain:show-runs', {
      label: 'Show BigTrain runs',
      icon: bigtrainIcon,
      execute: () => app.shell.activateById(sidebar.id)
    });
    registerNotebookCommands(app, notebooks);
    restorer?.restore(panels, { command: 'nbtrain:open-run', args: w => ({ id: w.content.runId }),
                                name: w => w.content.runId });

    for (const command of ['nbtrain:insert-cell', 'nbtrain:open-config', 'nbtrain:open-tutorial', 'nbtrain:show-runs']) {
      palette?.addItem({ command, category: CATEGORY });
    }
    app.contextMenu.addItem({ command: 'nbtrain:insert-cell', selector: '.jp-Notebook', rank: 20 });
    app.contextMenu.addItem({ command: 'nbtrain:open-config', selector: '.jp-Notebook', rank: 21 });
    launcher?.add({ command: 'nbtrain:open-tutorial', category: 'Notebook', rank: 90 });
    app.commands.addCommand('nbtrain:new-notebook', {
      label: 'BigTrain notebook',
      caption: 'A new notebook with nbtrain loaded and a %%bigtrain cell',
      icon: bigtrainIcon,
      execute: async () => {
        const panel = (await app.commands.execute('notebook:create-new', { kernelName: 'python3' })) as NotebookPanel;
        await panel.context.ready;
        notebooks.currentWidget === panel || app.shell.activateById(panel.id);
        await app.commands.execute('nbtrain:insert-cell');
      }
    });
    launcher?.add({ command: 'nbtrain:new-notebook', category: 'Notebook', rank: 89 });

    // A toolbar button on every notebook; not on Notebook 7's pages without notebooks (tree, edit,
    // consoles): a widget extension registered there makes its document manager reload its settings
    // while they load, which fails ("Cannot convert undefined or null to object" in the console).
    if (!notebook7Page || notebook7Page === 'notebooks') {
      app.docRegistry.addWidgetExtension('Notebook', {
        createNew: (panel: NotebookPanel) => {
          const button = new ToolbarButton({
            icon: bigtrainIcon, label: '%%bigtrain', tooltip: 'Insert %%bigtrain cell',
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
        item, align: 'left', rank: 50, isActive: () => model.runs.runs.some(r => !r.final), activeStateChanged: model.changed
      });
    }
    model.refresh();
  }
};

export default plugin;
