"""Stand-in of ai-toolkit's ExtensionJob: each process's type selects an extension's process class."""

from toolkit.extension import get_all_extensions_process_dict


class ExtensionJob:
    def __init__(self, config):
        self.raw_config = config
        self.config = config['config']
        self.job = config['job']
        self.name = self.config['name']
        self.meta = dict(config.get('meta', {}))
        process_dict = get_all_extensions_process_dict()
        self.process = []
        for i, process in enumerate(self.config['process']):
            if process['type'] not in process_dict:
                raise ValueError(f'config file is invalid. Unknown process type: {process["type"]}')
            self.process.append(process_dict[process['type']](i, self, process))

    def run(self):
        for process in self.process:
            process.run()
