"""lm-evaluation-harness's own command line with anita's model registered:

    python -m anita.eval run --model anita --model_args pretrained=DIR,adapter=DIR,quantize=nf4 --tasks arc_it

lm-eval 0.4.13 reads no entry points, so its bare `lm_eval` command cannot see a model that an
installed package defines; importing `anita.eval.harness` first registers "anita". What AnitaLM
refuses (a bad batch_size, a named chat template) ends the command with one line and exit code 2.
"""

import sys

from anita.errors import AnitaError
from anita.eval.harness import require_lm_eval

if __name__ == "__main__":
    try:
        require_lm_eval()
    except AnitaError as e:
        sys.exit(f"anita: error: {e}")
    from lm_eval.__main__ import cli_evaluate

    try:
        code = cli_evaluate()
    except AnitaError as e:  # AnitaLM's refusals (a bad batch_size, a named chat template) in one line
        print(f"anita: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)
