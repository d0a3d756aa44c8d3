"""Converting a model: the options (options.py), each component's settings (settings.py), the stage loop that
converts and installs components (run.py) with its steps (convert.py, export.py, validate.py, metadata.py), the
package folder it writes (package.py), and `--validate-only` (validate_only.py)."""
from .options import ComponentOptions, ConversionOptions
from .run import ConversionReport, convert_model
from .validate_only import validate_package

__all__ = ["ComponentOptions", "ConversionOptions", "ConversionReport", "convert_model", "validate_package"]
