"""The LLaMAntino-3-ANITA recipe's own values (docs/recipe.md): the three stages as run configs
(`anita_1_sft.toml`, `anita_2_dpo.toml`, `anita_3_italian.toml`, read with `--config`), and the
authors' Italian system prompt."""

from pathlib import Path

RECIPES_DIR = Path(__file__).parent

ANITA_SYSTEM_PROMPT = (  # the authors' Italian system prompt, typo "un an" included (docs/recipe.md)
    "Sei un an assistente AI per la lingua Italiana di nome LLaMAntino-3 ANITA (Advanced Natural-based "
    "interaction for the ITAlian language). Rispondi nella lingua usata per la domanda in modo chiaro, "
    "semplice ed esaustivo."
)
