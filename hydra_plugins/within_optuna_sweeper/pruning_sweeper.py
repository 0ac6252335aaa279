"""`hydra/sweeper=optuna_pruning`, the sweeper of hparams_search=optuna: Hydra's Optuna sweeper with a pruner.

Hydra finds this plugin the way it finds its own: it imports every module of the `hydra_plugins`
namespace package, and only classes defined there may be a sweeper's `_target_`. The work is in
_impl.py, imported when the sweeper is built (as Hydra's plugin does, so a plain run need not import optuna).
"""
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class PruningOptunaSweeper(OptunaSweeper):
    """Hydra's OptunaSweeper with one more argument, `pruner`: an optuna pruner (Hydra builds it from
    `hydra.sweeper.pruner`), or None for no pruning."""

    def __init__(self, pruner: Any = None, **kwargs: Any) -> None:
        from ._impl import PruningOptunaSweeperImpl

        # not super().__init__(): all it does is build Hydra's OptunaSweeperImpl; this builds the subclass
        self.sweeper = PruningOptunaSweeperImpl(pruner=pruner, **kwargs)


@dataclass
class PruningOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.within_optuna_sweeper.pruning_sweeper.PruningOptunaSweeper"
    # an optuna pruner's config, e.g. {_target_: optuna.pruners.MedianPruner}; null: nothing is pruned
    pruner: Any = None


ConfigStore.instance().store(group="hydra/sweeper", name="optuna_pruning", node=PruningOptunaSweeperConf,
                             provider="within")
