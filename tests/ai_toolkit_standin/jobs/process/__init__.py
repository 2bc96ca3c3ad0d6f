from jobs.process.BaseSDTrainProcess import BaseSDTrainProcess  # noqa: F401
