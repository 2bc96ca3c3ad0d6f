"""Stand-in of ai-toolkit's toolkit/extension.py: modules in extensions/ and extensions_built_in/ list their
extensions in AI_TOOLKIT_EXTENSIONS; each has a uid (the process type) and get_process()."""

import importlib
import os
import pkgutil

TOOLKIT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Extension(object):
    name: str = None
    uid: str = None

    @classmethod
    def get_process(cls):
        pass


def get_all_extensions():
    found = []
    for sub_dir in ['extensions', 'extensions_built_in']:
        for _, name, _ in pkgutil.iter_modules([os.path.join(TOOLKIT_ROOT, sub_dir)]):
            module = importlib.import_module(f"{sub_dir}.{name}")
            listed = getattr(module, "AI_TOOLKIT_EXTENSIONS", None)
            if isinstance(listed, list):
                found.extend(listed)
    return found


def get_all_extensions_process_dict():
    return {ext.uid: ext.get_process() for ext in get_all_extensions()}
