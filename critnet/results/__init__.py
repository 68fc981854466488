"""The result objects of the public API: :class:`Ranking` (:func:`critnet.rank`), :class:`Sweep`
(:func:`critnet.prune_sweep`, :func:`critnet.compare_orders`) and :class:`Campaign` (:func:`critnet.fault_campaign`).

They hold the rows and the summary of an analysis and write every artifact the command line writes (the callbacks
call the same methods, so the files are the same bytes whichever front end ran the analysis). Lightning-free.
"""

from critnet.results.campaign_result import Campaign
from critnet.results.ranking_result import LevelRanking, Ranking
from critnet.results.sweep_result import Sweep

__all__ = ["Campaign", "LevelRanking", "Ranking", "Sweep"]
