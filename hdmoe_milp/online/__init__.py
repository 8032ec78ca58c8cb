"""Online stage: per-batch rebalancing of the offline plan, peers, and trace replay."""

from .policies import POLICIES, make_policy, prebroadcast_count
from .rebalancer import Action, GreedyRebalancer, RebalancerConfig
from .replay import ReplayResult, replay

__all__ = ["POLICIES", "Action", "GreedyRebalancer", "RebalancerConfig", "ReplayResult", "make_policy",
           "prebroadcast_count", "replay"]
