"""What is known of the patient besides the image: sex and chronological age, read the
same way from labels, test CSVs, the command line, a web form and DICOM headers."""

from __future__ import annotations

import numpy as np

from .errors import DataError

MAX_AGE_MONTHS = 300.0     # beyond the oldest bone age (RSNA: 228 months) with room

SEX_VALUES = {"male": ("m", "male", "true", "1", "1.0"),
              "female": ("f", "female", "false", "0", "0.0")}


def parse_sex(value: object) -> bool | None:
    """The one reading of a patient's sex, for labels (``male`` column), test CSVs
    (``Sex``), ``--sex`` and DICOM headers: True = male, False = female, None = not
    one of ``SEX_VALUES`` (M/F, male/female, true/false, 1/0; any case)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in SEX_VALUES["male"]:
        return True
    if text in SEX_VALUES["female"]:
        return False
    return None


def sex_or_error(value: object, where: str) -> bool:
    """:func:`parse_sex`, or a DataError naming ``where`` and the accepted values."""
    male = parse_sex(value)
    if male is None:
        raise DataError(f"{where}: sex {value!r} is not one of M/F, male/female, "
                        "true/false, 1/0.")
    return male


def age_or_error(value: object, where: str) -> float:
    """Chronological age in months (0-300), or a DataError naming ``where``."""
    try:
        months = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: chronological age {value!r} is not a number of "
                        "months.") from None
    if not 0.0 <= months <= MAX_AGE_MONTHS:
        raise DataError(f"{where}: chronological age {months:g} months is outside 0-"
                        f"{MAX_AGE_MONTHS:g}; give it in months (10 years = 120).")
    return months


class SexContradiction(DataError):
    """The sex given contradicts the DICOM header's PatientSex."""


def sex_with_header(given: bool | None, header_sex: str, where: str, override: str,
                    overridden: bool) -> bool | None:
    """The sex to use for one image: ``given`` (True = male) unless the DICOM header's
    PatientSex (M/F) contradicts it and ``overridden`` is false (then
    :class:`SexContradiction` naming ``where`` and how to ``override``), else the
    header's, else None."""
    from_header = parse_sex(header_sex) if header_sex in ("M", "F") else None
    if given is not None and from_header is not None and given != from_header \
            and not overridden:
        raise SexContradiction(f"{where}: the sex given ({'M' if given else 'F'}) "
                               f"contradicts the DICOM header's PatientSex ({header_sex}); "
                               f"check the file, or {override} to use yours.")
    return given if given is not None else from_header
