"""Every Python snippet of README.md runs as written (offline: the bundled model and tiny random models)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
    from lightkv import adapters
    from lightkv.methods import registry

    names, known_adapters = set(registry.method_names()), list(adapters.ADAPTERS)
    try:
        exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": f"readme_{index}"})
    finally:  # snippets may register methods or adapters: leave the registries as they were
        for name in set(registry.method_names()) - names:
            registry.unregister_method(name)
        adapters.ADAPTERS[:] = known_adapters
        adapters._refresh_families()
