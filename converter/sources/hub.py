"""The Hugging Face hub's refusals, each as one line that says what to do instead: the one translation of
huggingface_hub's errors for every download the converter makes (models, VAEs, ControlNets, safety checkers, LoRAs)."""
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import ConversionError


@contextmanager
def hub_refusals(what: str, alternative: str, revision: str | None = None, file: str | None = None,
                 name_a_file: str = "") -> Iterator[None]:
    """Downloading `what` (a hub id, as the line names it) inside this block: a refusal of the hub is a
    ConversionError ending in `alternative` ("pass a local diffusers folder"); `file` is the one file asked for, if
    any, and `name_a_file` how to ask for another when the repository does not hold it."""
    target = f"{what} ({file})" if file else what
    try:
        yield
    except GatedRepoError:
        raise ConversionError(f"{what} is gated: accept its license on huggingface.co and log in (hf auth login), "
                              f"or {alternative}") from None
    except RepositoryNotFoundError:
        raise ConversionError(f"{what} was not found on the Hugging Face hub (or is private: log in with hf auth "
                              f"login), or {alternative}") from None
    except RevisionNotFoundError:
        raise ConversionError(f"{what} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:  # offline (or no answer) and not in the cache
        raise ConversionError(f"cannot reach the Hugging Face hub to download {target}, and it is not in the local "
                              f"cache: connect to the network (or log in and accept the model's license), or "
                              f"{alternative}") from None
    except EntryNotFoundError:
        raise ConversionError(f"{what} holds no {file}; {name_a_file or alternative}") from None
    except HfHubHTTPError as error:
        raise ConversionError(f"downloading {target} failed: {str(error).splitlines()[0]}") from None
