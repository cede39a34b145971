"""Reading recipe YAML as people write it (YAML 1.2-style numbers and booleans) and `--set` overrides.

    finetune sft recipes/tiny-moe/sft.yaml --set sft.learning_rate=1e-4
Layer: recipe.
"""

from __future__ import annotations

import re

import yaml

from finetune.errors import Problem


class _Loader(yaml.SafeLoader):
    """YAML with 1.2-style floats and booleans (PyYAML implements YAML 1.1).

    Floats: YAML 1.1 reads `1e-4` as a string, which nobody means.
    Booleans: YAML 1.1 also reads yes/no/on/off (any case) as booleans, so `eval_strategy: no`
    (a real TRL value) arrived as False and failed. We read only true/false as booleans, as
    YAML 1.2, JSON and most other tools do: a string field gets exactly what was written, and a
    boolean field given `yes` is an error that says to write true/false. Guessing a boolean
    where the field wants a string (or the reverse) would be silently wrong somewhere.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"""
               r"""|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"""),
    list("-+0123456789."),
)


# Words YAML 1.1 reads as booleans; our loader keeps them strings (see _Loader).
YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}
BOOL_HINT = " (write true or false; yes/no/on/off are read as strings)"


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)

def apply_overrides(raw: dict, overrides: list[str]) -> list[Problem]:
    """Apply `--set a.b.c=value` (value parsed as YAML) to the raw mapping in place."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or "" in key.split("."):
            problems.append(Problem(f"--set {item}", "expected key.path=value, e.g. --set sft.learning_rate=1e-4"))
            continue
        try:
            value = load_yaml(text)
        except yaml.YAMLError as exc:
            # Taking broken YAML as a plain string once made `data.train=[x.jsonl, ` a file name.
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            problems.append(Problem(f"--set {item}", f"the value is not valid YAML ({reason}); "
                                    f"quote a string value: --set '{key}=\"...\"'"))
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(Problem(f"--set {key}", f"`{part}` is not a mapping in this recipe"))
                break
        else:
            node[parts[-1]] = value
    return problems
