"""Outage clustering under a storm: 200 reports from 50 customers about one roaming failure, mixed with other traffic.

The messages go the real way: enqueued into intake, then processed by a Worker until the queue is empty.
They are written the way customers write: English, Swedish and Spanish, short and long, the country in the
writer's language or only the roaming partner's network, counts or none, other countries named as working,
follow-ups in the thread (In-Reply-To / References, Slack threads), signatures naming where the company sits.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from email.utils import format_datetime

import pytest
from sqlalchemy import select

from triagebot import outage
from triagebot.db import queue
from triagebot.db.engine import open_db
from triagebot.db.tables import Case, CaseEvent, Intake, MessageRow
from triagebot.model import TIERS
from triagebot.settings import Settings
from triagebot.worker import Worker

START = datetime(2026, 11, 23, 9, 0, tzinfo=timezone.utc)
WINDOW_SECONDS = 600
STORM_CUSTOMERS = 50
STORM_MESSAGES = 200
CRITICAL_FROM = 20          # the configured number of customers past which the parent is critical
SUPPORT = "support@support.example.net"


@dataclass(frozen=True)
class Raw:
    """One message as it arrives: channel, bytes, and what the test expects of it."""

    channel: str
    raw: bytes
    at: datetime
    message_id: str
    customer: str          # the case's customer as the bot names it
    storm: bool            # part of the roaming failure
    root: bool             # the first message of its customer's thread (storm) / a message of its own (other)
    expect: str = "case"   # case | ignored


# -- how customers write about the roaming failure ------------------------------------------------------------

PLACES = {
    "en": ["in Germany", "in Germany", "in Germany (Telekom.de)", "on Vodafone.de", "on the Deutsche Telekom network",
           "on O2 Germany", "in Deutschland", "on the German networks", "on Telekom.de (262-01)", "in Germany"],
    "sv": ["i Tyskland", "i Tyskland", "i Tyskland", "på Telekom.de", "på tyska nät", "i Tyskland (Vodafone.de)",
           "hos er roamingpartner i Tyskland", "i Tyskland"],
    "es": ["en Alemania", "en Alemania", "en Alemania (Telekom.de)", "en la red de Vodafone.de", "en las redes alemanas",
           "con el operador alemán O2", "en Alemania"],
}
DEVICES = {
    "en": ["trackers", "trucks", "vehicles", "alarm units", "sensors", "routers", "cold-chain loggers", "e-scooters",
           "GPS collars", "telematics units", "POS terminals", "containers"],
    "sv": ["spårare", "lastbilar", "fordon", "larm", "sensorer", "routrar", "kylbilar", "trygghetslarm",
           "GPS-halsband", "bilar"],
    "es": ["localizadores", "camiones", "vehículos", "alarmas", "sensores", "routers", "terminales", "contenedores",
           "equipos"],
}
# noun phrases for the affected SIMs: a count, "all", a vague plural or nothing
AMOUNTS = {
    "en": ["about {n} of our {d}", "all our {d}", "{n} {d}", "some of our {d}", "hundreds of our {d}",
           "all {n} of our {d}", "our {d}", "roughly {n} {d}", "a lot of our {d}", "around {n} {d}"],
    "sv": ["ca {n} av våra {d}", "alla våra {d}", "{n} {d}", "flera av våra {d}", "hundratals {d}",
           "alla våra {n} {d}", "våra {d}", "runt {n} {d}", "massor av {d}"],
    "es": ["unos {n} de nuestros {d}", "todos nuestros {d}", "{n} {d}", "varios de nuestros {d}", "cientos de {d}",
           "los {n} {d}", "nuestros {d}", "alrededor de {n} {d}", "muchísimos {d}"],
}


def _en(i: int, place: str, np: str) -> tuple[str, str]:
    t = [
        (f"Roaming outage {place}?", f"Hi,\n\nsince around 10:00 {np} {place} have no data. They attach but no PDP "
         f"context comes up. Devices in Sweden and Denmark are fine.\n\nPlease advise."),
        ("URGENT - devices offline", f"{np[0].upper() + np[1:]} stopped reporting {place} about 15 minutes ago. "
         "Roaming seems to be broken. Our operations are impacted, please look at it asap!"),
        ("No data while roaming", f"Hello support, we are seeing {np} failing to attach {place} since this morning. "
         "Registration is rejected and they fall back to no service. Anything known on your side?"),
        ("attach failures", f"{np} {place} can't attach. restarted a couple, same thing."),
        (f"Data roaming down {place}", f"Dear team,\n\nWe operate a fleet across Europe. Right now {np} {place} show "
         "'attached' in the portal but pass no traffic at all. In Spain and the Netherlands everything works normally, "
         "so this looks like the roaming partner. Our customers have started calling.\n\nKind regards"),
        ("Problem with roaming partner", f"Hi! Is there an ongoing issue {place}? {np[0].upper() + np[1:]} lost their data "
         "connection at the same time. Nothing was changed on our side."),
        ("Devices not connecting", f"Good morning,\n{np} {place} are not connecting to the network. The modems report "
         "'PDP authentication failure'. Could you check the roaming agreement / steering?\nThanks"),
        ("outage?", f"hey, {np} {place} are dead since 10ish, no data at all. is something down?"),
        ("Loss of connectivity abroad", f"Hello,\n\nFrom 09:55 CET {np} travelling {place} dropped off. The SIMs are "
         "active and have credit, and the same units reconnect as soon as they cross into Poland. We suspect a "
         "problem with your roaming partner. This affects deliveries today.\n\nBest regards"),
        ("Germany - no service", f"Please check roaming {place}: {np} have been without data for a while now. "
         "Nothing in your status page."),
        (f"Connection issues {place}", f"Hi,\n\nOur monitoring just raised an alarm: {np} {place} went silent. "
         "When we try a manual network selection the devices get 'roaming not allowed'. Swedish units are OK.\n\nCheers"),
        ("Data outage", f"We have an outage: {np} {place} cannot set up data sessions. Started 10:02. "
         "Escalating internally as well, please call back."),
    ]
    return t[i % len(t)]


def _sv(i: int, place: str, np: str) -> tuple[str, str]:
    t = [
        ("Ingen data i roaming", f"Hej,\n\nsedan ca kl 10 har {np} {place} ingen data. De registrerar sig men får "
         "ingen datasession. I Sverige och Norge funkar allt som vanligt.\n\nMvh"),
        ("Akut: enheter nere", f"{np[0].upper() + np[1:]} {place} har slutat rapportera. Verkar vara roamingen som ligger "
         "nere. Det påverkar vår drift, hör av er snarast!"),
        ("Problem med roaming", f"Hej! Har ni någon störning {place}? {np[0].upper() + np[1:]} tappade uppkopplingen "
         "samtidigt för en kvart sedan. Vi har inte ändrat något."),
        ("funkar inte", f"hej, {np} {place} funkar inte, ingen data alls sedan tio. är det nåt fel hos er?"),
        (f"Bortfall {place}", f"Hej support,\n\nVi ser att {np} {place} inte kan ansluta. Modemen säger "
         "'registration denied'. Kan ni kolla roamingavtalet?\n\nTack på förhand"),
        ("Störning utomlands?", f"God morgon,\n{np} som kör {place} har tappat data sedan 09:55. SIM-korten är aktiva "
         "och kommer upp direkt när de passerar in i Danmark. Vi misstänker er roamingpartner.\nHälsningar"),
        ("Ingen trafik", f"Hej, {np} {place} ser uppkopplade ut i portalen men skickar ingen trafik. "
         "Omstart hjälper inte."),
        ("Larm utan data", f"Hej!\nVi har ett akut läge: {np} {place} har ingen dataförbindelse. "
         "Våra kunder ringer redan. Ring oss gärna."),
        ("Roaming nere?", f"Är roamingen nere {place}? {np[0].upper() + np[1:]} har varit utan data en stund nu, "
         "inget på er driftstatussida."),
        ("Avbrott", f"Hej,\n\nvår övervakning larmar: {np} {place} har tystnat helt. Vid manuellt nätval får enheterna "
         "'roaming not allowed'. Svenska enheter fungerar.\n\nMvh"),
    ]
    return t[i % len(t)]


def _es(i: int, place: str, np: str) -> tuple[str, str]:
    t = [
        ("Sin datos en roaming", f"Hola,\n\ndesde las 10:00 {np} {place} no tienen datos. Se registran pero no "
         "levantan sesión de datos. En España funcionan bien.\n\nUn saludo"),
        ("URGENTE: equipos caídos", f"{np[0].upper() + np[1:]} {place} han dejado de reportar hace un cuarto de hora. "
         "Parece que el roaming no funciona. Nos afecta a la operación, por favor revisadlo ya."),
        ("Problema con el roaming", f"Buenos días, ¿hay alguna incidencia {place}? {np[0].upper() + np[1:]} perdieron la "
         "conexión de datos a la vez. No hemos cambiado nada."),
        ("no van", f"hola, {np} {place} no conectan, sin datos desde las diez. ¿pasa algo?"),
        ("Fallo de conexión", f"Estimados,\n\n{np} {place} no consiguen registrarse en la red, el módem da "
         "'registration denied'. ¿Podéis revisar el acuerdo de roaming?\n\nGracias"),
        ("Caída en el extranjero", f"Hola,\n{np} que circulan {place} se quedaron sin datos a las 09:55. Las SIM "
         "están activas y vuelven a conectar al pasar a Francia. Sospechamos de vuestro operador de roaming.\nSaludos"),
        ("Sin tráfico", f"Hola, {np} {place} aparecen conectados en el portal pero no envían tráfico. "
         "Reiniciarlos no ayuda."),
        ("Incidencia grave", f"Buenas,\ntenemos una incidencia grave: {np} {place} están sin conexión de datos. "
         "Nuestros clientes ya están llamando. Llamadnos por favor."),
        ("¿Roaming caído?", f"¿Está caído el roaming {place}? {np[0].upper() + np[1:]} llevan un rato sin datos y no vemos "
         "nada en vuestra página de estado."),
    ]
    return t[i % len(t)]


WRITERS = {"en": _en, "sv": _sv, "es": _es}

FOLLOW_UPS = {
    "en": ["Any update on this? Still no data.", "Still down here, it's {n} units now.",
           "We restarted a few devices, no change.", "Our customers are starting to call us. Please give us an ETA.",
           "Same picture: attach OK, no PDP context.", "Is this a known issue with the roaming partner?",
           "Adding my colleague. Still nothing on our side.", "Update: it is now {n} devices without data.",
           "Can you confirm you are working on it?", "Just checked again, still no traffic from Germany.",
           "Could you escalate this please?", "We see the devices switching between networks but no data.",
           "Is there an incident page we can follow?", "Hello? We need an answer, this hurts us.",
           "A few came back for a minute and dropped again.", "Our NOC counts {n} affected units at the moment."],
    "sv": ["Någon uppdatering?", "Fortfarande ingen data, nu {n} enheter.", "Vi har startat om några, ingen skillnad.",
           "Kunderna ringer oss nu, när är det löst?", "Samma sak här, de registrerar sig men ingen data.",
           "Är det roamingpartnern som strular?", "Lägger till min kollega. Fortfarande nere.",
           "Nu är det {n} enheter som är nere.", "Kan ni bekräfta att ni jobbar på det?",
           "Kollade igen, fortfarande tyst från Tyskland.", "Kan ni eskalera detta?",
           "Hallå? Vi behöver svar, det här kostar oss pengar.", "Några kom tillbaka en minut och föll bort igen."],
    "es": ["¿Alguna novedad?", "Seguimos sin datos, ya son {n} equipos.", "Hemos reiniciado algunos, sin cambios.",
           "¿Tenéis una hora estimada de solución?", "Igual que antes: se registran pero sin datos.",
           "¿Es un problema del operador de roaming?", "Añado a mi compañero. Seguimos caídos.",
           "Ahora son {n} equipos sin conexión.", "¿Podéis confirmar que lo estáis mirando?",
           "Lo he vuelto a comprobar, nada desde Alemania.", "¿Podéis escalarlo, por favor?",
           "¿Hola? Necesitamos una respuesta, esto nos está costando dinero."],
}

# (sender or slack team/channel, language, registry name when known): 5 registered customers, 45 unknown domains
STORM = [
    ("henrik.madsen@nordtrans.example", "en", "NordTrans A/S"),
    ("h.okafor@savannapark.example", "en", "Savanna Wildlife Park"),
    ("niklas.ek@hissteknik.example", "sv", "HissTeknik Stockholm AB"),
    ("slack:T0TRYGGA:C0TRYGGALARM", "sv", "Trygga Hem Omsorg AB"),
    ("slack:T0VOLTUP:C0VOLTUPOPS", "en", "VoltUp Charging Ltd"),
] + [(f"{user}@{dom}.example", lang, None) for user, dom, lang in [
    ("ops", "fleetwise", "en"), ("noc", "coldchain-logistics", "en"), ("it", "rheinfracht", "en"),
    ("support", "scootly", "en"), ("m.baker", "baker-haulage", "en"), ("alerts", "trackpoint", "en"),
    ("jane", "petguard", "en"), ("dispatch", "eurobus-lines", "en"), ("admin", "payterm", "en"),
    ("tech", "agrisense", "en"), ("service", "boxtrail", "en"), ("ops", "marinelink", "en"),
    ("l.chen", "medcourier", "en"), ("it-ops", "alpine-rentals", "en"), ("support", "vendline", "en"),
    ("olle", "kyltransport", "sv"), ("drift", "norrfrakt", "sv"), ("anna.l", "hemlarm-syd", "sv"),
    ("it", "skogsmaskin", "sv"), ("support", "cykelpoolen", "sv"), ("erik", "vastbuss", "sv"),
    ("teknik", "lantbruksdata", "sv"), ("info", "bilpoolen-gbg", "sv"), ("karin", "fiskexport", "sv"),
    ("noc", "elbolaget-mitt", "sv"), ("service", "husvagnsspar", "sv"), ("drift", "taxi-norr", "sv"),
    ("jonas", "mobilkran", "sv"), ("sistemas", "transportes-ebro", "es"), ("it", "frutas-levante", "es"),
    ("soporte", "flotasur", "es"), ("operaciones", "mudanzas-rapidas", "es"), ("jmartin", "gruas-castilla", "es"),
    ("tecnico", "alarmas-hogar", "es"), ("it", "autocares-norte", "es"), ("soporte", "vending-iberia", "es"),
    ("operaciones", "frio-express", "es"), ("lucia", "telemetria-agro", "es"), ("sistemas", "logistica-atlas", "es"),
    ("it", "patinetes-urbanos", "es"), ("ana.ruiz", "seguridad-movil", "es"), ("ops", "cargoline", "en"),
    ("support", "nordic-tracking", "en"), ("fleet", "haulier-direct", "en"), ("drift", "fjallbuss", "sv"),
]]
assert len(STORM) == STORM_CUSTOMERS and len({s for s, _l, _n in STORM}) == STORM_CUSTOMERS

SIGNATURES = {  # some writers sign off naming where they sit: that country is not where the outage is
    3: "\n\n-- \nFleetwise Ltd\nUnit 4, Harbour Road, Dublin, Ireland",
    9: "\n\nBest regards\nTrackpoint Solutions\nManchester, United Kingdom",
    21: "\n\nMed vänliga hälsningar\nNorrfrakt AB\nUmeå, Sweden",
    35: "\n\nAtentamente,\nFlotasur S.L.\nSevilla, España",
}


def _mail(sender: str, subject: str, body: str, at: datetime, msgid: str, *, reply_to: list[str] | None = None,
          headers: dict[str, str] | None = None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, SUPPORT, subject
    m["Date"] = format_datetime(at)
    m["Message-ID"] = msgid
    if reply_to:
        m["In-Reply-To"] = reply_to[-1]
        m["References"] = " ".join(reply_to)
    for k, v in (headers or {}).items():
        m[k] = v
    m.set_content(body)
    return bytes(m)


def _slack(team: str, channel: str, user: str, text: str, at: datetime, thread_ts: str | None = None) -> tuple[bytes, str]:
    ts = f"{at.timestamp():.6f}"
    event = {"type": "message", "channel": channel, "user": user, "text": text, "ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    env = {"type": "event_callback", "team_id": team, "event_id": f"Ev{ts.replace('.', '')}", "event": event}
    return json.dumps(env, ensure_ascii=False).encode(), f"slack:{team}:{channel}:{ts}"


def storm_messages() -> list[Raw]:
    """The 200 roaming-failure reports of 50 customers: one root each, the rest follow-ups in the same thread."""
    rnd = random.Random(4)
    out: list[Raw] = []
    follow_counts = [(1, 2, 3, 4, 5)[i % 5] for i in range(STORM_CUSTOMERS)]   # 150 follow-ups in all
    assert STORM_CUSTOMERS + sum(follow_counts) == STORM_MESSAGES
    per_lang: dict[str, int] = {}
    for i, (who, lang, name) in enumerate(STORM):
        k = per_lang[lang] = per_lang.get(lang, -1) + 1
        n = rnd.choice([12, 25, 40, 60, 85, 120, 150, 240, 300, 450, 800, 1200, 2500])
        dev = DEVICES[lang][(k * 5 + i) % len(DEVICES[lang])]
        np = AMOUNTS[lang][(k * 3 + i // 7) % len(AMOUNTS[lang])].format(n=n, d=dev)
        place = PLACES[lang][(k + i // 3) % len(PLACES[lang])]
        subject, body = WRITERS[lang](k, place, np)
        body += SIGNATURES.get(i, "")
        root_at = START + timedelta(seconds=int(i * 300 / STORM_CUSTOMERS) + rnd.randint(0, 5))
        times = sorted(root_at + timedelta(seconds=rnd.randint(10, WINDOW_SECONDS - 1 - int((root_at - START)
                                                                                         .total_seconds())))
                       for _ in range(follow_counts[i]))
        picks = rnd.sample(range(len(FOLLOW_UPS[lang])), follow_counts[i])
        customer = name or who.split("@", 1)[1]
        if who.startswith("slack:"):
            _s, team, channel = who.split(":")
            user = f"U0{team[2:6]}{i:02d}"
            raw, mid = _slack(team, channel, user, f"{subject}: {body}", root_at)
            root_ts = mid.rsplit(":", 1)[1]
            out.append(Raw("slack", raw, root_at, mid, customer, True, True))
            for j, (at, p) in enumerate(zip(times, picks)):
                text = FOLLOW_UPS[lang][p].format(n=n + 10 * (j + 1))
                raw, mid = _slack(team, channel, f"{user}{j % 2}", text, at, thread_ts=root_ts)
                out.append(Raw("slack", raw, at, mid, customer, True, False))
            continue
        local, domain = who.split("@")
        chain = [f"<storm-{i}-0@{domain}>"]
        out.append(Raw("email", _mail(who, subject, body, root_at, chain[0]), root_at, chain[0], customer, True, True))
        prefix = {"en": "Re: ", "sv": "SV: ", "es": "RE: "}[lang]
        for j, (at, p) in enumerate(zip(times, picks)):
            sender = who if j % 3 != 2 else f"colleague{j}@{domain}"   # a colleague answers in the thread too
            text = FOLLOW_UPS[lang][p].format(n=n + 10 * (j + 1))
            if j % 2:
                text += f"\n\nOn {format_datetime(root_at)} {who} wrote:\n> {body.splitlines()[0]}"
            mid = f"<storm-{i}-{j + 1}@{domain}>"
            out.append(Raw("email", _mail(sender, prefix + subject, text, at, mid, reply_to=list(chain)), at, mid,
                           customer, True, False))
            chain.append(mid)
    assert len(out) == STORM_MESSAGES
    return out


# -- unrelated traffic in the same ten minutes --------------------------------------------------------------------

def other_messages() -> list[Raw]:
    """Billing, orders, SMS, data in other countries, voice in Germany, auto-replies and bounces: none joins."""
    at = iter(START + timedelta(seconds=15 + 19 * k) for k in range(100))
    out: list[Raw] = []

    def mail(sender: str, subject: str, body: str, customer: str | None = None, expect: str = "case",
             **headers: str) -> None:
        when = next(at)
        mid = f"<other-{len(out)}@{sender.split('@')[1]}>"
        raw = _mail(sender, subject, body, when, mid, headers={k.replace("_", "-"): v for k, v in headers.items()})
        out.append(Raw("email", raw, when, mid, customer or sender.split("@")[1], False, True, expect))

    mail("ekonomi@nordtrans.example", "Invoice question",
         "Hi, on the October invoice there is a line 'Roaming data zone 1 - Germany'. What does that charge cover?",
         customer="NordTrans A/S")
    mail("faktura@kyltransport.example", "Fel på fakturan",
         "Hej, fakturan för oktober är dubbelt så hög som vanligt. Vi vill att ni krediterar mellanskillnaden.")
    mail("admin@contabilidad-mar.example", "Factura de noviembre",
         "Hola, ¿nos podéis enviar la factura de noviembre en PDF? No la encontramos en el portal.")
    mail("purchasing@fleetwise.example", "SIM order",
         "Hello, we would like to buy 500 more SIM cards (triple cut, M2M) for our new trucks. Please send a quote.")
    mail("inkop@laddpunkt.example", "Beställning SIM-kort",
         "Hej! Vi vill beställa 200 nya SIM-kort till våra laddstolpar. Leverans till vårt lager i Borås.")
    mail("compras@frutas-levante.example", "Pedido de SIMs",
         "Buenos días, queremos comprar 1000 SIMs para un proyecto nuevo en Alemania. ¿Nos enviáis una oferta?")
    mail("ops@alarmhub.example", "SMS not delivered",
         "Since this morning SMS from our platform to 12 alarm panels are not delivered. The API returns OK.")
    mail("larm@sakerhetsbolaget.example", "SMS kommer inte fram",
         "Hej, SMS till våra larmcentraler i Tyskland kommer inte fram sedan i morse. Datan fungerar.")
    mail("soporte@domotica-sur.example", "Los SMS no llegan",
         "Hola, los SMS de activación no llegan a los dispositivos desde ayer. ¿Podéis revisarlo?")
    mail("sistemas@aparcalevante.example", "Parquímetros sin datos",
         "Hola, desde las 10:00 unos 200 parquímetros en España no tienen datos, el APN no responde. En Alemania no "
         "tenemos equipos.", customer="Aparcamientos Levante S.L.")
    mail("drift@energinat-vast.example", "APN-problem",
         "Hej, ett 20-tal mätare i Sverige tappar datasessionen mot vårt APN sedan kl 10. Övriga fungerar.")
    mail("it@polskitrans.example", "Trackers in Poland without data",
         "Hi, our 35 trackers in Poland have had no data since yesterday evening. Germany and Czechia look fine.")
    # two pairs of reports that name no country and share only their greetings: not one problem
    mail("it@nordbygg.example", "Router without data",
         "Hi, one of our routers at the Stockholm office has had no data since this morning. Could you please check "
         "it? Thanks")
    mail("ops@sensorfarm.example", "Slow sensors",
         "Hello, some of our sensors have had very slow data since this morning and the app times out. Could you "
         "please check what is going on? Thanks")
    mail("it@oficinas-centro.example", "Router sin datos",
         "Hola, desde esta mañana uno de nuestros routers de la oficina de Zaragoza no tiene datos. ¿Podéis "
         "revisarlo, por favor? Gracias")
    mail("soporte@riego-listo.example", "Sensores lentos",
         "Hola, desde esta mañana los sensores de riego van muy lentos y la aplicación no responde. ¿Podéis "
         "revisarlo, por favor? Gracias")
    mail("tech@liftcall.example", "Emergency phones cannot call in Germany",
         "Hello, voice calls from our elevator emergency phones in Germany fail since 10:00, callers get a busy tone. "
         "Data is working. This is a safety issue.")
    mail("service@hissteknik.example", "Samtal kopplas inte fram",
         "Hej, röstsamtal från våra hisstelefoner i Norge kopplas inte fram, det blir tyst direkt. Datan funkar.",
         customer="HissTeknik Stockholm AB")
    mail("ana@viajes-gps.example", "Tarifa de roaming en Alemania",
         "Hola, ¿cuánto cuesta el MB de datos en roaming en Alemania con nuestra tarifa actual?")
    mail("it@rheinfracht.example", "Enable roaming",
         "Please enable data roaming in Germany and Austria for the 25 new SIMs we activated yesterday.")
    mail("portal@boxtrail.example", "Portal login fails",
         "None of us can log in to the connectivity portal since 10:05, it says 'invalid session'.")
    mail("ops@fleetwise.example", "Automatic reply: Roaming outage in Germany?",
         "I am out of the office until 30 November with limited access to e-mail. For urgent matters call our NOC.",
         customer="fleetwise.example", expect="ignored", Auto_Submitted="auto-replied")
    mail("olle@kyltransport.example", "Frånvaro: SV: Ingen data i roaming",
         "Hej! Jag är på semester till och med 1 december. Vid brådskande ärenden, kontakta drift@kyltransport.example.",
         expect="ignored", Auto_Submitted="auto-replied")
    mail("soporte@flotasur.example", "Respuesta automática: Sin datos en roaming",
         "Estoy fuera de la oficina hasta el lunes. Para urgencias llame al centro de control.",
         expect="ignored", X_Autoreply="yes")
    when = next(at)
    bounce = (b"From: Mail Delivery System <MAILER-DAEMON@mx.marinelink.example>\r\nTo: " + SUPPORT.encode() +
              b"\r\nSubject: Undelivered Mail Returned to Sender\r\nMessage-ID: <bounce-1@mx.marinelink.example>\r\n"
              b"Date: " + format_datetime(when).encode() + b"\r\nMIME-Version: 1.0\r\n"
              b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n--b1\r\n"
              b"Content-Type: text/plain\r\n\r\nYour message about the roaming outage in Germany could not be "
              b"delivered.\r\n<nobody@marinelink.example>: 550 5.1.1 User unknown\r\n\r\n--b1\r\n"
              b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.marinelink.example\r\n\r\n"
              b"Final-Recipient: rfc822; nobody@marinelink.example\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b1--\r\n")
    out.append(Raw("email", bounce, when, "<bounce-1@mx.marinelink.example>", "marinelink.example", False, True,
                   "ignored"))
    raw, mid = _slack("T0MALARKR", "C0MALARDRIFT", "U0MALAR01",
                      "Hej, ett tiotal mätare i Uppsala får ingen data via APN:et sedan en timme. I Tyskland har vi "
                      "inga kort, så det är inte roamingen.", next(at))
    out.append(Raw("slack", raw, START + timedelta(seconds=400), mid, "Mälarkraft Elnät AB", False, True))
    return out


# -- the test -------------------------------------------------------------------------------------------------

# TAXONOMY.md: few is 2-10 or a plural with no number, many 11-999 or "hundreds", mass 1000 or "thousands";
# "all our devices" of a customer whose fleet size is not known is a plural
TIER_LEAST = {"none": 0, "single": 1, "few": 2, "many": 11, "mass": 1000, "fleet": 2}


def _tier(estimate: int) -> str:
    return next((t for n, t in ((1000, "mass"), (11, "many"), (2, "few"), (1, "single")) if estimate >= n), "none")


@pytest.fixture(scope="module")
def traffic() -> list[Raw]:
    msgs = storm_messages() + other_messages()
    assert max(m.at for m in msgs) - min(m.at for m in msgs) < timedelta(seconds=WINDOW_SECONDS)
    return sorted(msgs, key=lambda m: m.at)


def test_outage_storm_makes_one_parent_with_exactly_the_storm_cases(db_url, traffic):
    settings = Settings(database_url=db_url, outage_critical_customers=CRITICAL_FROM)
    _engine, sessions = open_db(db_url)
    for m in traffic:
        queue.enqueue(sessions, m.channel, m.raw, origin="test:storm")
    Worker(settings, name="storm").run(until_empty=True)

    with sessions() as s:
        assert {i.state for i in s.scalars(select(Intake))} == {"done"}
        rows = {r.message_id: r for r in s.scalars(select(MessageRow))}
        missing = [m.message_id for m in traffic if m.message_id not in rows]
        assert not missing, f"not stored: {missing[:5]}"

        # every customer of the storm has one case; follow-ups thread into it
        storm = [m for m in traffic if m.storm]
        case_of: dict[str, int] = {}
        for m in storm:
            r = rows[m.message_id]
            if m.root:
                assert r.action == "created", (m.message_id, r.action)
                assert case_of.setdefault(m.customer, r.case_id) == r.case_id
        for m in storm:
            r = rows[m.message_id]
            assert r.case_id == case_of[m.customer], (m.message_id, r.action, r.trail[-4:])
            if not m.root:
                assert r.action == "threaded", (m.message_id, r.trail[-4:])
        assert len(case_of) == STORM_CUSTOMERS

        # every storm case is an incident (its service may be misread: "our customers are calling us" is not voice)
        children_expected = set(case_of.values())
        wrong = [(c.reference, c.customer, c.category, c.service) for c in s.scalars(
            select(Case).where(Case.id.in_(children_expected))) if c.category != "incident"]
        assert not wrong, f"storm cases triaged as something else: {wrong}"

        parents = s.scalars(select(Case).where(Case.kind == "incident")).all()
        assert len(parents) == 1, [(p.reference, p.subject, p.customer) for p in parents]
        parent = parents[0]
        children = s.scalars(select(Case).where(Case.parent_id == parent.id)).all()
        got = {c.id for c in children}
        strays = s.scalars(select(Case).where(Case.id.in_(got - children_expected))).all()
        assert not strays, [(c.reference, c.customer, c.subject, c.features.get("countries")) for c in strays]
        left_out = s.scalars(select(Case).where(Case.id.in_(children_expected - got))).all()
        assert not left_out, [(c.reference, c.customer, c.subject, c.features.get("countries")) for c in left_out]

        # the affected customers, to keep all of them updated
        expected_customers = sorted({m.customer for m in storm})
        assert len(expected_customers) == STORM_CUSTOMERS
        assert outage.affected_customers(s, parent) == expected_customers
        last = s.scalars(select(CaseEvent).where(CaseEvent.case_id == parent.id, CaseEvent.kind == "outage_updated")
                         .order_by(CaseEvent.id.desc()).limit(1)).one()
        assert last.detail["customers"] == expected_customers and last.detail["children"] == STORM_CUSTOMERS
        assert parent.customer == f"{STORM_CUSTOMERS} customers"

        # blast radius: the sum of what the children know: an estimate, else the least its tier means
        known = sum(c.blast_estimate or TIER_LEAST[c.blast_tier] for c in children)
        assert known == sum(outage.known_count(c.blast_estimate, c.blast_tier) for c in children)
        assert any(c.blast_estimate is None for c in children)   # "some of our", "hundreds of": no number given
        assert parent.blast_estimate == known
        widest = max((c.blast_tier for c in children), key=TIERS.index)
        assert parent.blast_tier == max(_tier(known), widest, key=TIERS.index)
        assert parent.blast_tier in ("mass", "fleet")
        # critical: past the configured number of customers (and its children's own severities)
        assert parent.severity == "critical"
        crossed = [e for e in s.scalars(select(CaseEvent).where(CaseEvent.case_id == parent.id,
                                                                 CaseEvent.kind == "outage_updated"))
                   if len(e.detail["customers"]) >= CRITICAL_FROM]
        assert crossed and all(e.detail["severity"] == "critical" for e in crossed)

        # nothing else has a parent, and the auto-replies and bounces made no case at all
        others = [m for m in traffic if not m.storm]
        for m in others:
            r = rows[m.message_id]
            if m.expect == "ignored":
                assert (r.action, r.case_id) == ("ignored", None), (m.message_id, r.disposition)
                continue
            assert r.case_id not in children_expected, (m.message_id, r.trail[-4:])
            case = s.get(Case, r.case_id)
            assert case.parent_id is None, (m.message_id, case.category, case.service, case.features.get("countries"))
        assert s.scalar(select(Case).where(Case.kind == "case", Case.parent_id.is_not(None),
                                           Case.id.not_in(children_expected)).limit(1)) is None

        # every child's trail shows the link, and the parent's trail shows the cluster opening
        linked = {e.case_id: e for e in s.scalars(select(CaseEvent).where(CaseEvent.kind == "outage_linked"))}
        assert set(linked) == children_expected
        assert all(e.detail["parent"] == parent.reference for e in linked.values())
        opened = s.scalars(select(CaseEvent).where(CaseEvent.case_id == parent.id,
                                                   CaseEvent.kind == "outage_opened")).one()
        assert opened.detail["first"] in {c.reference for c in children}


def test_two_workers_racing_through_the_storm_make_one_parent(db_url, traffic):
    """Two workers take turns at random: still one parent, made once, with every storm case and nothing else."""
    import threading
    firsts = [m for m in traffic if m.root]     # each customer's first message (a reply needs its root stored first)
    settings = Settings(database_url=db_url, outage_critical_customers=CRITICAL_FROM, worker_batch=1)
    _engine, sessions = open_db(db_url)
    for m in firsts:
        queue.enqueue(sessions, m.channel, m.raw, origin="test:race")
    workers = [Worker(settings, name=f"race-{i}") for i in range(2)]
    errors: list[BaseException] = []

    def run(w: Worker) -> None:
        try:
            while w.run_once():
                time.sleep(0.002)   # let the other worker in: on SQLite one thread could otherwise take it all
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)

    with sessions() as s:
        assert {i.state for i in s.scalars(select(Intake))} == {"done"}
        assert len({i.claimed_by for i in s.scalars(select(Intake))}) == 2   # both workers did some of it
        rows = {r.message_id: r for r in s.scalars(select(MessageRow))}
        storm_cases = {rows[m.message_id].case_id for m in firsts if m.storm}
        parents = s.scalars(select(Case).where(Case.kind == "incident")).all()
        assert len(parents) == 1, [(p.reference, p.customer) for p in parents]
        children = {c.id for c in s.scalars(select(Case).where(Case.parent_id == parents[0].id))}
        assert children == storm_cases
        assert len(s.scalars(select(CaseEvent).where(CaseEvent.kind == "outage_opened")).all()) == 1
        assert outage.affected_customers(s, parents[0]) == sorted({m.customer for m in firsts if m.storm})


@pytest.mark.parametrize("threshold", [3, 4])
def test_critical_from_the_configured_number_of_customers(db_url, threshold):
    """Reports of a few SIMs each: the outage turns critical when the configured number of customers is reached."""
    settings = Settings(database_url=db_url, outage_critical_customers=threshold)
    _engine, sessions = open_db(db_url)
    reports = [
        ("ops@alpha-fleet.example", "Trackers in Germany", "Hi, 3 of our trackers in Germany have no data since 10:00."),
        ("drift@beta-frakt.example", "Spårare i Tyskland", "Hej, 4 av våra spårare i Tyskland har ingen data sedan kl 10."),
        ("it@gamma-logistica.example", "Localizadores en Alemania",
         "Hola, 2 de nuestros localizadores en Alemania no tienen datos desde las 10."),
    ]
    for k, (sender, subject, body) in enumerate(reports):
        at = START + timedelta(seconds=30 * k)
        queue.enqueue(sessions, "email", _mail(sender, subject, body, at, f"<few-{k}@{sender.split('@')[1]}>"))
    Worker(settings, name="few").run(until_empty=True)
    with sessions() as s:
        parent = s.scalars(select(Case).where(Case.kind == "incident")).one()
        children = s.scalars(select(Case).where(Case.parent_id == parent.id)).all()
        assert len(children) == 3 and all(c.severity != "critical" for c in children)
        assert parent.blast_estimate == 9 and parent.blast_tier == "few"
        last = s.scalars(select(CaseEvent).where(CaseEvent.case_id == parent.id, CaseEvent.kind == "outage_updated")
                         .order_by(CaseEvent.id.desc()).limit(1)).one()
        if threshold <= 3:
            assert parent.severity == "critical"
            assert last.detail["reason"] == f"3 customers affected (critical from {threshold})"
        else:
            assert parent.severity != "critical" and last.detail["reason"] is None


# -- how a report is read: where the problem is, which service, which words ------------------------------------

@pytest.mark.parametrize("text, countries, set_aside", [
    ("Our trucks in Germany have no data. Trucks in Denmark and Sweden are fine.", {"DE"}, {"DK", "SE"}),
    ("Våra larm i Tyskland har ingen data, men i Sverige funkar allt.", {"DE"}, {"SE"}),
    ("En España funcionan bien pero en Alemania no hay datos.", {"DE"}, {"ES"}),
    ("Vehicles on Telekom.de (262-01) cannot attach.", {"DE"}, set()),
    ("Los localizadores en las redes alemanas no conectan.", {"DE"}, set()),
    ("Våra spårare på tyska nät har tappat data.", {"DE"}, set()),
    ("Parquímetros en España sin datos. En Alemania no tenemos equipos.", {"ES"}, {"DE"}),
    ("Mätarna i Uppsala har ingen data. I Tyskland har vi inga kort.", set(), {"DE"}),
    ("No data in Poland. The same units reconnect as soon as they cross into Germany.", {"PL"}, {"DE"}),
    ("Sin datos en Alemania. En Francia funcionan sin problemas.", {"DE"}, {"FR"}),
])
def test_signature_counts_the_countries_where_the_problem_is(text, countries, set_aside):
    sig = outage.signature(None, text, "data", None)
    assert (set(sig.countries), set(sig.set_aside)) == (countries, set_aside)


def test_signature_service_follows_the_text_when_the_classifier_names_another():
    calling = outage.signature(None, "Våra spårare i Tyskland har ingen dataförbindelse. Kunderna ringer oss redan.",
                               "voice", None)
    assert calling.service == "data" and "voice" in calling.note
    voice = outage.signature(None, "Voice calls from our lift phones in Germany fail. Data is working.", "voice", None)
    assert voice.service == "voice" and not voice.note
    portal = outage.signature(None, "The portal shows no data for our trackers.", "platform", None)
    assert portal.service == "platform"


def test_reports_without_a_country_need_more_than_greetings_and_one_word_in_common():
    a = outage.signature(None, "Hi, one of our routers has had no data since this morning. Please check. Thanks", "data", None)
    b = outage.signature(None, "Hello, our router is very slow since this morning, please check it. Thanks", "data", None)
    c = outage.signature(None, "All our trackers lost data connection at 10:00 today", "data", None)
    d = outage.signature("Trackers down", "Our trackers lost their data connection around 10:00, all of them.", "data", None)
    assert outage.same_problem(a, b)[0] is False
    assert outage.same_problem(c, d)[0] is True
    sms = outage.signature(None, "SMS to all our trackers are lost since 10:00 today", "sms", None)
    assert outage.same_problem(c, sms) == (False, "different service")


def test_a_mistake_in_countries_yaml_names_the_file_and_line(tmp_path):
    from triagebot.rules_loader import RULES_DIR, RuleError
    text = (RULES_DIR / "countries.yaml").read_text(encoding="utf-8")
    lines = text.split("\n")
    n = next(i for i, line in enumerate(lines, 1) if "code: DE" in line)
    lines[n - 1] = lines[n - 1].replace("code: DE", "code: Germany")
    (tmp_path / "countries.yaml").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(RuleError) as err:
        outage.CountryRules.load(tmp_path)
    assert err.value.line == n and "countries.yaml" in str(err.value) and "ISO 3166" in str(err.value)
    (tmp_path / "countries.yaml").write_text(text.replace('"fail\\\\w*"', '"fail(\\\\w*"'), encoding="utf-8")
    with pytest.raises(RuleError, match="not a regular expression"):
        outage.CountryRules.load(tmp_path)


def test_a_report_after_the_window_starts_afresh(db_url):
    """Reports more than the configured window after an outage's last report do not join it."""
    settings = Settings(database_url=db_url, outage_window_minutes=60)
    _engine, sessions = open_db(db_url)
    reports = [("ops@alpha-fleet.example", "Hi, 30 of our trackers in Germany have no data since 10:00."),
               ("drift@beta-frakt.example", "Hej, 40 av våra spårare i Tyskland har ingen data sedan kl 10."),
               ("it@gamma-logistica.example", "Hola, 20 de nuestros localizadores en Alemania no tienen datos.")]

    def send(k: int) -> None:
        sender, body = reports[k]
        queue.enqueue(sessions, "email", _mail(sender, "No data", body, START, f"<late-{k}@{sender.split('@')[1]}>"))
        Worker(settings, name="late").run(until_empty=True)

    send(0)
    send(1)
    with sessions() as s, s.begin():
        for c in s.scalars(select(Case)):     # two hours pass
            c.created_at, c.updated_at = c.created_at - timedelta(hours=2), c.updated_at - timedelta(hours=2)
    send(2)
    with sessions() as s:
        parent = s.scalars(select(Case).where(Case.kind == "incident")).one()
        assert outage.affected_customers(s, parent) == ["alpha-fleet.example", "beta-frakt.example"]
        late = s.scalars(select(Case).where(Case.customer == "gamma-logistica.example")).one()
        assert late.parent_id is None


def test_the_window_is_about_when_reports_arrived_not_when_a_worker_got_to_them(db_url):
    """After a backlog, two reports that arrived minutes apart three hours ago are still one outage, and one
    that arrived three hours after them is not, though all three are processed in the same minute."""
    from triagebot.db.tables import Intake
    settings = Settings(database_url=db_url, outage_window_minutes=60)
    _engine, sessions = open_db(db_url)
    reports = [("ops@alpha-fleet.example", "Hi, 30 of our trackers in Germany have no data since 10:00.", 185),
               ("drift@beta-frakt.example", "Hej, 40 av våra spårare i Tyskland har ingen data sedan kl 10.", 180),
               ("it@gamma-logistica.example", "Hola, 20 de nuestros localizadores en Alemania no tienen datos.", 0)]
    for k, (sender, body, _ago) in enumerate(reports):
        queue.enqueue(sessions, "email", _mail(sender, "No data", body, START, f"<backlog-{k}@{sender.split('@')[1]}>"))
    with sessions() as s, s.begin():   # the queue was stuck: two arrived 3 hours ago, 5 minutes apart; one now
        rows = s.scalars(select(Intake).order_by(Intake.id)).all()
        for row, (_s, _b, ago) in zip(rows, reports):
            row.received_at = row.received_at - timedelta(minutes=ago)
    Worker(settings, name="backlog").run(until_empty=True)
    with sessions() as s:
        parent = s.scalars(select(Case).where(Case.kind == "incident")).one()
        assert outage.affected_customers(s, parent) == ["alpha-fleet.example", "beta-frakt.example"]
        late = s.scalars(select(Case).where(Case.customer == "gamma-logistica.example")).one()
        assert late.parent_id is None
