import subprocess
import sys

import layerscope


def test_all_is_exactly_what_the_package_exports():
    public = {n for n in vars(layerscope) if not n.startswith("_")} - {
        # submodules are attributes too, not exports
        "apply", "errors", "estimate", "layer_utils", "plan", "render", "scan", "units",
    } | {"scan", "__version__"}
    assert sorted(layerscope.__all__) == layerscope.__all__
    assert set(layerscope.__all__) == public


def test_every_export_resolves():
    for name in layerscope.__all__:
        assert getattr(layerscope, name) is not None


def test_errors_subclass_the_builtin_a_user_would_catch():
    assert issubclass(layerscope.PlanError, ValueError)
    assert issubclass(layerscope.StructureError, ValueError)
    assert issubclass(layerscope.ModelTypeError, TypeError)
    assert issubclass(layerscope.ConfigError, ValueError)
    assert issubclass(layerscope.PlanError, layerscope.LayerscopeError)


def test_import_does_not_load_transformers():
    code = "import sys, layerscope; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
