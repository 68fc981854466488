"""The machinery of fault campaigns (Lightning-free): fault sites and bit views, stratified draws sized by
Leveugle's formula, the exact evaluation of each fault against the golden run, and the statistics of the rates.

The analysis itself is :func:`critnet.fault_campaign` (:mod:`critnet.analyses.campaign`); its result is
:class:`critnet.Campaign`.
"""
