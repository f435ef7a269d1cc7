"""Identifier extraction (TAXONOMY.md "identifiers"): ICCID, IMSI, MSISDN, IMEI in en/sv/es, lists, and the traps."""
from __future__ import annotations

import pytest

from triagebot.extract.identifiers import extract_identifiers, luhn_ok


def luhn(body: str) -> str:
    """`body` with its Luhn check digit appended."""
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError("unreachable")


ICCID_19 = luhn("894607120004412095")                 # 19 digits with check digit
ICCID_20 = luhn("8946077146756818674")                # 20 digits with check digit
ICCID_ES = luhn("893407110042781356")
IMEI = "352099001761481"                               # a valid IMEI (Luhn)
IMSI_SE = "240077495336976"
IMSI_ES = "214071234567890"


def ids(text: str, lang: str = "en", attachments: str = "") -> dict[str, list[str]]:
    return extract_identifiers(text, lang, attachments).as_dict()


def spaced(s: str, n: int = 4) -> str:
    return " ".join(s[i:i + n] for i in range(0, len(s), n))


def test_luhn() -> None:
    assert luhn_ok("79927398713")
    assert not luhn_ok("79927398710")
    assert luhn_ok(IMEI)


@pytest.mark.parametrize("text,lang", [
    (f"the SIM is {ICCID_19}, please check", "en"),
    (f"ICCID: {spaced(ICCID_19)}", "en"),
    (f"ICCID {'-'.join(spaced(ICCID_19).split())}", "sv"),
    (f"la SIM {ICCID_19} no navega", "es"),
    (f"kortet {ICCID_19[:-1] + ICCID_19[-1]}F sitter i mätaren", "sv"),
])
def test_iccid_19_digits_in_any_form(text: str, lang: str) -> None:
    assert ids(text, lang)["iccid"] == [ICCID_19]


def test_iccid_20_digits_and_trailing_f() -> None:
    assert ids(f"ICCID {spaced(ICCID_20)}")["iccid"] == [ICCID_20]
    padded = ICCID_19 + "F"                    # a 19-digit ICCID padded to 20 nibbles
    assert ids(f"sim {padded}")["iccid"] == [ICCID_19]


def test_iccid_without_check_digit_is_still_accepted() -> None:
    body = "894607120004412095"
    bad = body + str((int(luhn(body)[-1]) + 1) % 10)
    assert not luhn_ok(bad)
    assert ids(f"ICCID {bad}")["iccid"] == [bad]


def test_iccid_glued_to_a_label_prefers_the_luhn_valid_reading() -> None:
    a, b = luhn("894410003013100101"), luhn("894410003013100102")
    text = f"CP-WF-01 {spaced(a)}\nCP-WF-02 {spaced(b)}"
    assert ids(text)["iccid"] == [a, b]


def test_several_iccids_deduplicated_in_order() -> None:
    a, b = luhn("894607120010000013"), luhn("894607120010000021")
    text = f"Affected:\n{a}\n{b}\n{a}\nand again {spaced(b)}"
    assert ids(text)["iccid"] == [a, b]


def test_not_an_iccid() -> None:
    assert ids("order 8946071200044120950123 is a long number")["iccid"] == []   # 22 digits
    assert ids("ref 12345678901234567890")["iccid"] == []                        # not starting 89


def test_imsi_by_label_and_by_country_code() -> None:
    assert ids(f"IMSI {IMSI_SE} – senast data 14:17", "sv")["imsi"] == [IMSI_SE]
    assert ids(f"registrada con {IMSI_ES}", "es")["imsi"] == [IMSI_ES]
    assert ids(f"IMSI: {IMSI_SE}\nIMSI: 234150000000001")["imsi"] == [IMSI_SE, "234150000000001"]


def test_imei_by_label_and_check_digit() -> None:
    assert ids(f"ICCID {ICCID_19}\nIMEI {IMEI}")["imei"] == [IMEI]
    assert ids(f"IMEI: 35-209900-176148-1")["imei"] == [IMEI]
    assert ids(f"the modem {IMEI} rebooted")["imei"] == [IMEI]            # 35.. is no MCC; Luhn-valid


def test_imsi_and_imei_told_apart() -> None:
    got = ids(f"IMEI {IMEI}, IMSI {IMSI_SE}")
    assert got["imei"] == [IMEI] and got["imsi"] == [IMSI_SE]
    # labelled IMEI that fails the check digit is not an IMEI
    bad_imei = IMEI[:-1] + str((int(IMEI[-1]) + 1) % 10)
    assert ids(f"IMEI {bad_imei}")["imei"] == []
    # a 15-digit number with no known country code and no valid check digit is nothing
    assert ids("value 999999999999990 seen") == {"iccid": [], "imsi": [], "msisdn": [], "imei": []}


def test_imei_list_under_a_header_line() -> None:
    a = luhn("35209900176148")
    b = luhn("35209900176149")
    got = ids(f"IMEI:\n{a}\n{b}")
    assert got["imei"] == [a, b] and got["imsi"] == []


@pytest.mark.parametrize("text,lang,expected", [
    ("MSISDN +46 76 000 12 34", "en", "+46760001234"),
    ("numret är 070-123 45 67", "sv", "+46701234567"),
    ("kortets nummer 0701234567 svarar inte", "sv", "+46701234567"),
    ("la línea 612 345 678 no funciona", "es", "+34612345678"),
    ("el número 612345678 no recibe SMS", "es", "+34612345678"),
    ("Lift 1: +44 7700 900810", "en", "+447700900810"),
    ("+46 (0)70 123 45 67 has no data", "en", "+46701234567"),
    ("0046 70 123 45 67 no data", "en", "+46701234567"),
    ("larmnummer +46 70-812 33 90 har bytts ut", "sv", "+46708123390"),
])
def test_msisdn_normal_form(text: str, lang: str, expected: str) -> None:
    assert ids(text, lang)["msisdn"] == [expected]


def test_national_numbers_only_in_their_language() -> None:
    assert ids("the number 070-123 45 67 has no data", "en")["msisdn"] == []
    assert ids("please check 07700 900531", "en")["msisdn"] == []
    assert ids("numret 612 345 678", "sv")["msisdn"] == []
    assert ids("línea 070-123 45 67", "es")["msisdn"] == []


def test_landlines_are_not_read_as_sim_numbers() -> None:
    assert ids("larmet ringer 08-123 456 78", "sv")["msisdn"] == []
    assert ids("el equipo llama al 963 41 22 80", "es")["msisdn"] == []


@pytest.mark.parametrize("text,lang", [
    ("Call me on +46 70 123 45 67 if you need more", "en"),
    ("please call us at +44 7700 900412", "en"),
    ("Ring mig på 070-123 45 67 så tar vi det", "sv"),
    ("ring oss på 0701234567", "sv"),
    ("NECESITO QUE ALGUIEN ME LLAME YA. 655 201 998", "es"),
    ("Llámame al 612 345 678 cuando puedas", "es"),
    ("mi móvil es 612 345 678", "es"),
    ("Ring gärna:\n070-555 12 34", "sv"),
    ("Bridge: we're on +46 10 555 66 77 until resolved", "en"),
    ("from 1 April the technical contact will be Sam Price (sam@x.example, +44 7700 900455)", "en"),
    ("el contacto técnico será Pablo Serrano (pserrano@x.example, 611 22 33 44)", "es"),
])
def test_the_writers_own_number_is_not_an_identifier(text: str, lang: str) -> None:
    assert ids(text, lang)["msisdn"] == []


@pytest.mark.parametrize("line,lang", [
    ("Tel: +49 821 4567 890", "en"),
    ("Tel. +46 8 555 012 34", "en"),
    ("Mobile: +44 7700 900412", "en"),
    ("Mob: +91 98450 12345", "en"),
    ("Direct: +44 121 496 0733 | Mobile: +44 7700 900412", "en"),
    ("T +31 20 123 4567", "en"),
    ("Tfn: 070-412 88 31", "sv"),
    ("Mobil: 070-603 77 18", "sv"),
    ("Jour: 070-998 12 40", "sv"),
    ("Växel 08-120 450 00", "sv"),
    ("Móvil: 612 345 678", "es"),
    ("Tel. 963 41 22 80 / 689 114 503", "es"),
    ("Teléfono: 612 345 678", "es"),
])
def test_signature_lines_that_leaked_into_the_text_are_ignored(line: str, lang: str) -> None:
    text = f"Some of our units are down.\n\nRegards\nAnna\n{line}"
    assert ids(text, lang)["msisdn"] == []


def test_contact_phrase_then_a_sim_number_in_the_next_sentence() -> None:
    got = ids("Ring mig på 070-123 45 67. Kortet har nummer 070-555 12 34", "sv")
    assert got["msisdn"] == ["+46705551234"]


@pytest.mark.parametrize("text,lang", [
    ("faktura 123456789 gäller mars", "sv"),
    ("factura nº 612345678 del mes pasado", "es"),
    ("order 4500012345 was delivered", "en"),
    ("ordernummer: 0701234567", "sv"),
    ("Referencia pedido 612345678", "es"),
    ("your case CASE-000123 and ticket 0048213", "en"),
    ("invoice INV-2025-004417 of 1,284.50 EUR", "en"),
    ("kundnummer 0701234567", "sv"),
])
def test_invoice_order_and_case_numbers_never_count(text: str, lang: str) -> None:
    assert ids(text, lang) == {"iccid": [], "imsi": [], "msisdn": [], "imei": []}


@pytest.mark.parametrize("text", [
    "2025-03-11 02:14:07 AT+CGATT? -> +CGATT: 1",
    "since 14:30 on 2025-03-01, rollout window 22:00-02:00 CET",
    "+CEREG: 1,\"4A2F\",\"01B3C102\",7",
    "peer 81.45.201.10 and 10.44.0.5, port 8883",
    "we paid 1 500 kr, € 3.500 and 3,500 EUR",
])
def test_dates_times_logs_and_amounts_are_not_identifiers(text: str) -> None:
    assert ids(text, "sv") == {"iccid": [], "imsi": [], "msisdn": [], "imei": []}


# --- attached lists ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("delimiter", [";", ",", "\t", "|"])
def test_csv_with_any_delimiter_and_header_columns(delimiter: str) -> None:
    a, b = luhn("894607714675681867"), luhn("894607469729762281")
    rows = [["ICCID", "MSISDN", "IMSI", "Status"],
            [a, "46701234567", IMSI_SE, "active"],
            [b, "46701234568", "240077304920566", "active"]]
    text = "\n".join(delimiter.join(r) for r in rows)
    got = ids("", "sv", text)
    assert got["iccid"] == [a, b]
    assert got["msisdn"] == ["+46701234567", "+46701234568"]
    assert got["imsi"] == [IMSI_SE, "240077304920566"]


def test_csv_order_column_is_skipped_and_national_numbers_read_with_language() -> None:
    text = f"Pedido,ICCID,Teléfono\n4500012345,{ICCID_ES},612345678\n"
    got = ids("", "es", text)
    assert got["iccid"] == [ICCID_ES]
    assert got["msisdn"] == ["+34612345678"]


def test_txt_list_one_per_line_and_xlsx_sheet_as_text() -> None:
    a, b, c = (luhn(f"89460701200048155{i}") for i in (1, 2, 3))
    assert ids("", "en", f"{a}\n{b}\n{c}\n")["iccid"] == [a, b, c]
    sheet = f"Site\tICCID\tNote\nUppsala\t{a}\tno data\nMalmö\t{b}\tno data\n"
    assert ids("", "en", sheet)["iccid"] == [a, b]


def test_text_and_attachment_identifiers_merge_without_duplicates() -> None:
    a, b = luhn("894607120010000013"), luhn("894607120010000021")
    got = ids(f"Example SIM: {a}", "en", f"ICCID\n{a}\n{b}\n")
    assert got["iccid"] == [a, b]


def test_distinct_sims_counts_the_largest_kind() -> None:
    e = extract_identifiers(f"ICCID {ICCID_19}\nIMEI {IMEI}\nMSISDN +46701234567 and +46701234568", "en")
    assert e.distinct_sims() == 2
