"""Teacher licences and the gate that refuses a teacher whose terms restrict training other models.

Distilling copies behaviour from a teacher into a student, so a teacher's terms can reach the student: some
forbid training other models on its outputs, others let it happen but require notices, names or use
restrictions to travel with the result. The gate here runs when the config is validated (opd.config), before
any worker starts; opd.provenance writes what the table says a student owes next to it.

The table is a summary to route attention, not legal advice: every notice says to check the licence text.
Only the stdlib is imported, and nothing of opd's: config validation must stay sub-second, and the config
imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


class LicenseWarning(UserWarning):
    """A teacher whose terms nobody recorded, or one used under `accept_terms`: the run goes on, loudly."""


class Teacher(Protocol):
    """What the gate reads of a teacher entry (opd.config.TeacherConfig)."""

    model: str
    license: str
    accept_terms: str

    @property
    def from_scratch(self) -> bool:
        """Made by opd from random weights, so no third party's terms apply."""
        ...


@dataclass(frozen=True)
class License:
    """What the licence gate and the model card need to know about one licence."""

    id: str
    name: str
    restricts_training: bool
    """True when the terms forbid (or typically forbid) using the model or its outputs to improve other models."""
    notice: str | None
    """Obligations that travel with a student trained on this teacher (None: nothing beyond the usual)."""
    url: str


_CHECK = "Check the licence text."


def _llama_notice(version: str, eu_multimodal: bool = False) -> str:
    """Llama 3.1+ terms: distillation is allowed, with naming, attribution and policy duties."""
    eu = (
        " Its Acceptable Use Policy withholds the licence for the multimodal models from individuals and companies"
        " based in the EU."
        if eu_multimodal
        else ""
    )
    return (
        f"Llama {version} Community License: a distributed model trained with Llama {version} or its outputs must have "
        'a name beginning with "Llama" and prominently display "Built with Llama"; ship a copy of the licence and '
        "follow the Llama Acceptable Use Policy; licensees above 700 million monthly active users need a separate "
        f"licence from Meta.{eu} {_CHECK}"
    )


def _llama(version: str, slug: str, eu_multimodal: bool = False) -> License:
    return License(
        id=f"llama{version}",
        name=f"Llama {version} Community License Agreement",
        restricts_training=False,
        notice=_llama_notice(version, eu_multimodal),
        url=f"https://www.llama.com/{slug}/license/",
    )


_TABLE = [
    License("apache-2.0", "Apache License 2.0", False, None, "https://www.apache.org/licenses/LICENSE-2.0"),
    License("mit", "MIT License", False, None, "https://opensource.org/license/mit"),
    License(
        "bsd-3-clause",
        'BSD 3-Clause "New" or "Revised" License',
        False,
        None,
        "https://opensource.org/license/bsd-3-clause",
    ),
    License(
        "cc-by-4.0",
        "Creative Commons Attribution 4.0 International",
        False,
        f"CC BY 4.0: if the student counts as Adapted Material, credit the teacher's creators and link the licence. "
        f"{_CHECK}",
        "https://creativecommons.org/licenses/by/4.0/",
    ),
    License(
        "cc-by-nc-4.0",
        "Creative Commons Attribution-NonCommercial 4.0 International",
        False,
        "CC BY-NC 4.0: non-commercial use only; if the student counts as Adapted Material it may only be used and "
        f"shared non-commercially, with attribution. {_CHECK}",
        "https://creativecommons.org/licenses/by-nc/4.0/",
    ),
    License(
        "openrail",
        "Open RAIL licence",
        False,
        "OpenRAIL: RAIL licences count models trained on the model's outputs (distillation) as derivatives and "
        f"require their use-based restrictions to be passed on with them. {_CHECK}",
        "https://huggingface.co/blog/open_rail",
    ),
    License(
        "bigscience-openrail-m",
        "BigScience OpenRAIL-M License",
        False,
        "BigScience OpenRAIL-M: a model distilled from the model's outputs is a Derivative of the Model; the use-based "
        f"restrictions (Attachment A) and a copy of the licence must go with it. {_CHECK}",
        "https://bigscience.huggingface.co/blog/bigscience-openrail-m",
    ),
    License(
        "llama2",
        "Llama 2 Community License Agreement",
        True,
        "Llama 2 Community License: Llama 2 and its outputs may not be used to improve any other large language model "
        "except Llama 2 and its derivative works; distribution needs a copy of the licence and the attribution notice, "
        f"and use must follow the Llama 2 Acceptable Use Policy. {_CHECK}",
        "https://www.llama.com/llama2/license/",
    ),
    License(
        # Only from 3.1 on did Meta allow outputs to improve other models; the 3.0 licence keeps the Llama 2 clause.
        "llama3",
        "Meta Llama 3 Community License Agreement",
        True,
        "Meta Llama 3 Community License: Llama 3 and its outputs may not be used to improve any other large language "
        "model except Meta Llama 3 and its derivatives; a distributed model built with it must have a name beginning "
        'with "Llama 3", display "Built with Meta Llama 3", ship a copy of the licence and follow the Acceptable Use '
        f"Policy. {_CHECK}",
        "https://www.llama.com/llama3/license/",
    ),
    _llama("3.1", "llama3_1"),
    _llama("3.2", "llama3_2", eu_multimodal=True),
    _llama("3.3", "llama3_3"),
    _llama("4", "llama4", eu_multimodal=True),
    License(
        "gemma",
        "Gemma Terms of Use",
        False,
        "Gemma Terms of Use: a model trained on Gemma's outputs (distillation) is a Model Derivative; distributing it "
        "requires passing on the use restrictions (incl. the Gemma Prohibited Use Policy) as an enforceable provision, "
        'a copy of the terms, and a Notice file reading "Gemma is provided under and subject to the Gemma Terms of Use '
        f'found at ai.google.dev/gemma/terms". {_CHECK}',
        "https://ai.google.dev/gemma/terms",
    ),
    License(
        "qwen",
        "Qwen License Agreement",
        False,
        'Qwen License Agreement: a distributed model trained or improved with Qwen or its outputs must display "Built '
        'with Qwen" or "Improved using Qwen" in its documentation; commercial use above 100 million monthly active '
        f"users needs a licence from Alibaba Cloud. {_CHECK}",
        "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/LICENSE",
    ),
    License(
        # The 2023 licence (Qwen, Qwen1.5, Qwen2-72B) has the Llama 2 style clause; check which one a model ships.
        "tongyi-qianwen",
        "Tongyi Qianwen License Agreement",
        True,
        "Tongyi Qianwen License Agreement: the Materials and their outputs may not be used to improve any other large "
        "language model except Tongyi Qianwen and its derivative works; commercial use above 100 million monthly "
        f"active users needs a licence from Alibaba Cloud. {_CHECK}",
        "https://github.com/QwenLM/Qwen/blob/main/Tongyi%20Qianwen%20LICENSE%20AGREEMENT",
    ),
    License(
        "qwen-research",
        "Qwen Research License Agreement",
        False,
        "Qwen Research License: non-commercial (research and evaluation) use only; a distributed model trained or "
        f'improved with it must display "Built with Qwen" or "Improved using Qwen". {_CHECK}',
        "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE",
    ),
    License(
        "deepseek",
        "DeepSeek License Agreement",
        False,
        "DeepSeek License Agreement: models distilled from the model's outputs count as Derivatives of the Model; the "
        f"use-based restrictions (Attachment A) must be passed on with them, with a copy of the licence. {_CHECK}",
        "https://github.com/deepseek-ai/DeepSeek-LLM/blob/main/LICENSE-MODEL",
    ),
    License(
        "proprietary-api",
        "Proprietary API terms of service",
        True,
        "Trained with outputs of a proprietary API: the provider's terms of service govern that use and commonly "
        "forbid developing competing models; check the provider's terms.",
        "",
    ),
    License("unspecified", "Unspecified (not checked)", False, None, ""),
]

CLOSED_ENDPOINTS: dict[str, str] = {
    "openai.com": "OpenAI's terms forbid using output to develop models that compete with OpenAI",
    "openai.azure.com": "Azure OpenAI serves OpenAI's models under terms that forbid using output to develop "
    "models that compete with them",
    "anthropic.com": "Anthropic's terms forbid using the services to build competing products, including "
    "training competing AI models",
    "generativelanguage.googleapis.com": "Google's Gemini API terms forbid using the services to develop models "
    "that compete with them",
}
"""Domains of closed providers' APIs (backend=openai teachers), matched with every subdomain, and why their terms
restrict distillation, whatever `license` an entry declares. A summary to route attention, not legal advice."""

ROUTERS: dict[str, tuple[str, ...]] = {"openrouter.ai": ("openai/", "anthropic/", "google/gemini")}
"""API routers and proxies that forward to many providers, and the model-name prefixes that reach a closed one
(whose terms then apply as if it were called directly)."""

LICENSES: dict[str, License] = {lic.id: lic for lic in _TABLE}
"""Known licences by lowercase id (Hugging Face `license:` tags where one exists)."""


def normalise_id(license_id: str) -> str:
    return license_id.strip().lower()


def lookup(license_id: str) -> License | None:
    """The table entry for an id (case-insensitive), or None when the id is not in the table."""
    return LICENSES.get(normalise_id(license_id))


def endpoint_host(url: str) -> str:
    """The lowercase host of a served teacher's URL, without a trailing dot ("" for none)."""
    return (urlsplit(url).hostname or "").lower().rstrip(".") if url else ""


def _within(host: str, domain: str) -> bool:
    return host == domain or host.endswith("." + domain)


def closed_endpoint(url: str, model: str) -> tuple[str, str] | None:
    """(the provider's domain, why its terms restrict distillation) when `url` reaches a closed provider's API:
    its own domain or any subdomain, or a router forwarding `model` to one; None otherwise."""
    host = endpoint_host(url)
    for domain, why in CLOSED_ENDPOINTS.items():
        if _within(host, domain):
            return domain, why
    for domain, prefixes in ROUTERS.items():
        if _within(host, domain) and model.lower().startswith(prefixes):
            return domain, f"{domain} forwards {model} to its provider, whose terms restrict distillation"
    return None


def license_problems(teachers: Iterable[Teacher]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the licence gate; errors refuse the run, warnings let it go on.

    A teacher whose licence restricts training is refused unless `accept_terms` says why this use is allowed
    (a written agreement, the student being a derivative the licence exempts, ...); that text is recorded.
    """
    errors: list[str] = []
    warnings: list[str] = []
    for i, t in enumerate(teachers):
        served = getattr(t, "backend", "") == "openai"
        closed = closed_endpoint(getattr(t, "url", ""), t.model) if served else None
        if closed is not None:
            why = f"teachers.{i}.url is {endpoint_host(t.url)} ({closed[0]}): {closed[1]}"
            if not t.accept_terms.strip():
                errors.append(
                    f"{why}. If this use is allowed (a written agreement with the provider), set "
                    f'teachers.{i}.accept_terms="<why you may>" to proceed; it is recorded in provenance.json'
                )
            else:
                warnings.append(f"{why}; proceeding under teachers.{i}.accept_terms={t.accept_terms!r}")
        lic = lookup(t.license)
        key = f"teachers.{i}.license={t.license}"
        if lic is None:
            warnings.append(
                f"{key} is not in opd's licence table (opd/licenses.py), so it is treated as unspecified: check that "
                f"the terms of {t.model} allow training another model on its outputs"
            )
        elif lic.id == "unspecified" and served:
            errors.append(
                f"teachers.{i}.license is unspecified, but a served teacher's weights are out of opd's sight: state "
                f"the licence of {t.model} (teachers.{i}.license=apache-2.0, llama3.1, ..., or proprietary-api)"
            )
        elif lic.id == "unspecified":
            if not t.from_scratch:
                warnings.append(
                    f"teachers.{i}.license is unspecified: nobody has recorded whether the terms of {t.model} allow "
                    f"training another model on its outputs; set teachers.{i}.license to its licence id "
                    f"(e.g. apache-2.0, llama3.1, gemma)"
                )
        elif lic.restricts_training:
            why = f"{lic.name} restricts using {t.model} or its outputs to train other models"
            if not t.accept_terms.strip():
                errors.append(
                    f"{key}: {why}. If this use is allowed (a written agreement, or the student is a derivative the "
                    f'licence exempts), set teachers.{i}.accept_terms="<why you may>" to proceed; it is recorded in '
                    "the student's provenance.json"
                )
            else:
                warnings.append(
                    f"{key}: {why}; proceeding under teachers.{i}.accept_terms={t.accept_terms!r} "
                    "(recorded in provenance.json)"
                )
    return errors, warnings


__all__ = [
    "CLOSED_ENDPOINTS",
    "LICENSES",
    "ROUTERS",
    "License",
    "LicenseWarning",
    "closed_endpoint",
    "endpoint_host",
    "license_problems",
    "lookup",
    "normalise_id",
]
