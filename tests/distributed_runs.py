"""Started under torchrun by test_distributed.py: several training runs in the same ranks
(one launch, whose start costs seconds, for all of them). Argument: a JSON list of
TrainSettings mappings."""

import json
import sys

from deltatune.train.settings import TrainSettings
from deltatune.train.trainer import Trainer

for mapping in json.loads(sys.argv[1]):
    Trainer(TrainSettings(**mapping), log=lambda _message: None, progress=False).run()
