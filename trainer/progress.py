"""Progress bars for long passes (indexing a corpus, tokenizing it): drawn on a terminal, silent in logs."""
import os
import sys


def shows_progress():
    """True when stderr is a terminal and this is the first (or only) process of a torchrun job."""
    return sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"


def progress_bar(total, desc, unit="it", unit_scale=False, delay=2.0):
    """A tqdm bar on stderr, or a disabled one (update/close do nothing) when output goes to a file or pipe.
    `delay` seconds pass before it is drawn, so a pass that ends sooner never shows one."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, delay=delay, file=sys.stderr,
                dynamic_ncols=True, disable=not shows_progress())
