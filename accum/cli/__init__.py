"""accum's command line: the run config schema and its flags, exit codes, model and data building
from a config, planning for a config, `python -m accum` and `python -m accum launch`.

The core modules of accum never import this package; scripts/ and the command line do
(core <- cli <- scripts).
"""
