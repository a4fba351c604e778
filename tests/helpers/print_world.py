"""Print this process's rank and the world size as Accelerate sees them (for launcher tests)."""

import sys

from accelerate import Accelerator

accelerator = Accelerator()
line = f"rank={accelerator.process_index} world={accelerator.num_processes} type={accelerator.distributed_type.value}\n"
sys.stdout.write(line)  # one write per record, so two ranks' lines interleave less
sys.stdout.flush()
