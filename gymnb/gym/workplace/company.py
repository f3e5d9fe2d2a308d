"""workplace_assistant environment, synthetic company: a seeded generator of the five tables and the directory.

The embedded default when no NeMo Gym data directory is configured. Same tables and columns as NeMo Gym's
(a few hundred rows each), its own people and records. A handful of rows are planted so that the ground truth
of NeMo Gym's public example rows (`workplace_example.jsonl`) is also the right answer here: carlos's last
email about 'Develop prototype for report generation' is 00000057, the last event on 2023-12-01 is 00000252,
akira's software leads, lena's won services customers, and the hardware proposals not contacted for four weeks
are exactly the customers those rows name. Everything else is drawn from `random.Random(seed)`.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
from pathlib import Path

from gymnb.gym.workplace.state import NOW, CompanyState, Row, load_state
from gymnb.gym.workplace.tools_records import CUSTOMER_STATUSES, PRODUCTS, TASK_BOARDS, TASK_LISTS

DOMAIN = "atlas.com"  # NeMo Gym's tasks name people at this domain (e.g. raj.patel@atlas.com)
USER_NAME = "Robin"  # the assistant's user: inbox emails are addressed to them
SALES_TEAM = ("akira.mori", "lena.fischer", "raj.patel", "priya.nair", "omar.haddad", "ingrid.larsen")
ENGINEERS = ("carlos.rivera", "maya.cohen", "tomas.novak", "kwame.asante", "elena.popescu", "diego.alvarez",
             "hana.suzuki", "marek.kowalski", "zara.ahmed", "felix.weber")
OTHERS = ("amara.okafor", "jonas.berg", "lucia.romano", "sven.lind")
EMPLOYEES = tuple(f"{p}@{DOMAIN}" for p in (*SALES_TEAM, *ENGINEERS, *OTHERS))

TASK_VERBS = ("Develop prototype for", "Fix bug in", "Write tests for", "Refactor", "Design mockups for",
              "Optimize", "Document", "Review code for", "Add logging to", "Update dependencies of",
              "Add monitoring to", "Migrate", "Localize", "Improve accessibility of", "Load test")
TASK_OBJECTS = ("report generation", "payment gateway", "user onboarding", "search service", "login page",
                "notification emails", "data export", "admin dashboard", "billing module", "mobile navigation",
                "image upload", "settings page", "audit trail", "recommendation widget", "API rate limiting",
                "checkout flow", "help center", "invoice templates", "team calendar", "file sharing")
EVENT_NAMES = ("sync up", "design review", "sprint planning", "one-on-one", "quarterly business review",
               "customer demo", "budget check-in", "hiring panel", "retrospective", "architecture deep dive",
               "Product Roadmap Workshop", "Security Awareness Training", "Vendor Negotiation",
               "Team Offsite Planning", "Release Readiness Review")
TOPICS = ("the Q4 roadmap", "the vendor contract", "the offsite agenda", "the hiring plan", "the security audit",
          "the pricing update", "the customer survey", "the budget forecast")
FIRST_NAMES = ("Alex", "Jamie", "Morgan", "Riley", "Casey", "Quinn", "Avery", "Rowan", "Sage", "Emerson",
               "Harper", "Jordan", "Kendall", "Parker", "Reese", "Skyler")
LAST_NAMES = ("Brooks", "Carter", "Dalton", "Ellis", "Foster", "Grant", "Hayes", "Irwin", "Jensen", "Keller",
              "Lowell", "Mercer", "Nolan", "Ortega", "Pryce", "Quint")
FIRMS = ("brightpath", "northwind", "bluepeak", "ironleaf", "suncrest", "quantaworks", "greenfield", "orbital",
         "keystone", "lumen")
NOTE_PHRASES = ("Had a call.", "Sent a quote.", "Saw the demo.", "Asked for references.", "Met at a conference.",
                "Requested a trial.")
TRAFFIC_SOURCES = ("direct", "referral", "search engine", "social media")

NOW_DT = dt.datetime.fromisoformat(NOW)
PLANTED_TASK = "Develop prototype for report generation"
PLANTED_EMAIL = {"email_id": "00000057", "inbox/outbox": "inbox", "sender/recipient": f"carlos.rivera@{DOMAIN}",
                 "subject": f"Task Update on {PLANTED_TASK}", "sent_datetime": "2023-11-18 14:34:22",
                 "body": f"Hi {USER_NAME},\n\nI've picked up '{PLANTED_TASK}' and will share a first cut next week."
                         "\n\nBest,\nCarlos"}
PLANTED_EARLIER_EMAIL = {**PLANTED_EMAIL, "email_id": "00000123", "sent_datetime": "2023-10-06 10:12:40",
                         "body": f"Hi {USER_NAME},\n\nI've been assigned '{PLANTED_TASK}'. Starting on it "
                                 "tomorrow.\n\nBest,\nCarlos"}
PLANTED_EVENT = {"event_id": "00000252", "event_name": "design review", "participant_email": f"maya.cohen@{DOMAIN}",
                 "event_start": "2023-12-01 15:00:00", "duration": "90"}
STALE_CUTOFF = (NOW_DT - dt.timedelta(weeks=4)).strftime("%Y-%m-%d")  # "haven't responded in 4 weeks"
PLANTED_CUSTOMERS = {  # ids -> fields that make them the answer to the example rows
    ("00000095", "00000080", "00000035"): {"assigned_to_email": f"akira.mori@{DOMAIN}",
                                           "product_interest": "Software", "status": "Lead"},
    ("00000009", "00000112", "00000039", "00000047"): {"assigned_to_email": f"lena.fischer@{DOMAIN}",
                                                       "product_interest": "Services", "status": "Won"},
    ("00000037", "00000195", "00000058", "00000132", "00000088"): {"product_interest": "Hardware",
                                                                   "status": "Proposal", "stale": True},
}


def _ids(rng: random.Random, count: int) -> list[str]:
    ids = [str(i).zfill(8) for i in range(1, count + 1)]
    rng.shuffle(ids)  # ids carry no order, as in NeMo Gym's data
    return ids


def _first_name(address: str) -> str:
    return address.split(".")[0].capitalize()


def _random_time(rng: random.Random, start: dt.date, end: dt.date) -> dt.datetime:
    day = start + dt.timedelta(days=rng.randrange((end - start).days + 1))
    return dt.datetime.combine(day, dt.time(rng.randrange(9, 17), rng.randrange(60), rng.randrange(60)))


def generate_emails(rng: random.Random, count: int = 300) -> list[Row]:
    tasks = [f"{v} {o}" for v in TASK_VERBS for o in TASK_OBJECTS]
    rows = []
    for email_id in _ids(rng, count):
        planted = next((e for e in (PLANTED_EMAIL, PLANTED_EARLIER_EMAIL) if e["email_id"] == email_id), None)
        if planted:
            rows.append(dict(planted))
            continue
        sent = _random_time(rng, dt.date(2023, 10, 1), dt.date(2023, 11, 30))
        person = rng.choice(EMPLOYEES)
        if rng.random() < 0.75:
            subject, body = _inbox_email(rng, person, tasks)
            # Keep 00000057 the last email from carlos about the planted task (an earlier one is fine).
            if subject == PLANTED_EMAIL["subject"] and person == PLANTED_EMAIL["sender/recipient"]:
                sent = _random_time(rng, dt.date(2023, 10, 1), dt.date(2023, 11, 17))
            rows.append({"email_id": email_id, "inbox/outbox": "inbox", "sender/recipient": person,
                         "subject": subject, "sent_datetime": f"{sent:%Y-%m-%d %H:%M:%S}", "body": body})
        else:
            topic = rng.choice(TOPICS)
            body = f"Hi {_first_name(person)},\n\nCould you send me your notes on {topic} by Friday?\n\n{USER_NAME}"
            rows.append({"email_id": email_id, "inbox/outbox": "outbox", "sender/recipient": person,
                         "subject": f"Notes on {topic}", "sent_datetime": f"{sent:%Y-%m-%d %H:%M:%S}", "body": body})
    rows.sort(key=lambda r: r["sent_datetime"])
    return rows


def _inbox_email(rng: random.Random, sender: str, tasks: list[str]) -> tuple[str, str]:
    name = _first_name(sender)
    if rng.random() < 0.6:
        task = rng.choice(tasks)
        progress = rng.choice((f"I've started on '{task}'.", f"'{task}' is done and ready for review.",
                               f"I'm blocked on '{task}' and could use your input."))
        return f"Task Update on {task}", f"Hi {USER_NAME},\n\n{progress}\n\nThanks,\n{name}"
    topic = rng.choice(TOPICS)
    question = rng.choice(("Do you have time to discuss", "I have a few questions about", "Here is my feedback on"))
    return f"Question about {topic}", f"Hi {USER_NAME},\n\n{question} {topic}.\n\nBest,\n{name}"


def generate_calendar(rng: random.Random, count: int = 300) -> list[Row]:
    planted_day = dt.date.fromisoformat(PLANTED_EVENT["event_start"][:10])
    forced_days = [planted_day] * 3  # a few earlier events that day, so "the last event" means something
    rows = []
    for event_id in _ids(rng, count):
        if event_id == PLANTED_EVENT["event_id"]:
            rows.append(dict(PLANTED_EVENT))
            continue
        day = forced_days.pop() if forced_days else dt.date(2023, 8, 1) + dt.timedelta(days=rng.randrange(153))
        while day.weekday() >= 5:
            day += dt.timedelta(days=1)
        duration = rng.choice((30, 60, 90, 120))
        latest_slot = (18 * 60 - duration - 9 * 60) // 30
        if day == planted_day:  # keep 00000252 the last event of its day
            latest_slot = min(latest_slot, (15 * 60 - duration - 9 * 60) // 30)
        start = dt.datetime.combine(day, dt.time(9)) + dt.timedelta(minutes=30 * rng.randrange(latest_slot + 1))
        rows.append({"event_id": event_id, "event_name": rng.choice(EVENT_NAMES),
                     "participant_email": rng.choice(EMPLOYEES), "event_start": f"{start:%Y-%m-%d %H:%M:%S}",
                     "duration": str(duration)})
    rows.sort(key=lambda r: r["event_start"])
    return rows


def generate_analytics(rng: random.Random, count: int = 500) -> list[Row]:
    visitors = [str(rng.randrange(10000)).zfill(4) for _ in range(count // 2)]
    rows = []
    for _ in range(count):
        page_views = rng.randint(1, 20)
        rows.append({"date_of_visit": (dt.date(2023, 8, 1) + dt.timedelta(days=rng.randrange(122))).isoformat(),
                     "visitor_id": rng.choice(visitors), "page_views": str(page_views),
                     "session_duration_seconds": str(rng.randint(1, 30) * page_views // 4 + 1),
                     "traffic_source": rng.choices(TRAFFIC_SOURCES, weights=(4, 2, 3, 2))[0],
                     "user_engaged": page_views > 8 or rng.random() < 0.2})
    rows.sort(key=lambda r: r["date_of_visit"])
    return rows


def _random_customer(rng: random.Random, customer_id: str) -> Row:
    first, last, firm = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(FIRMS)
    contact = dt.date(2023, 9, 1) + dt.timedelta(days=rng.randrange(91))
    notes = " ".join(f"{contact - dt.timedelta(days=rng.randrange(40)):%Y-%m-%d}: {rng.choice(NOTE_PHRASES)}"
                     for _ in range(rng.randrange(3)))
    return {"customer_id": customer_id, "assigned_to_email": f"{rng.choice(SALES_TEAM)}@{DOMAIN}",
            "customer_name": f"{first} {last}", "customer_email": f"{first}.{last}@{firm}.com".lower(),
            "customer_phone": (f"{rng.randrange(200, 999)}-{rng.randrange(100, 999)}-{rng.randrange(10000):04d}"
                               if rng.random() < 0.7 else None),
            "last_contact_date": contact.isoformat(), "product_interest": rng.choice(PRODUCTS),
            "status": rng.choice(CUSTOMER_STATUSES),
            "follow_up_by": (contact + dt.timedelta(days=rng.randrange(7, 45))).isoformat(), "notes": notes or None}


def _planted_group(customer: Row) -> tuple[str, ...] | None:
    """The planted group whose selection rule this customer satisfies, if any."""
    for ids, fields in PLANTED_CUSTOMERS.items():
        wanted = {k: v for k, v in fields.items() if k != "stale"}
        if all(customer[k] == v for k, v in wanted.items()) and (
                not fields.get("stale") or customer["last_contact_date"] < STALE_CUTOFF):
            return ids
    return None


def generate_customers(rng: random.Random, count: int = 200) -> list[Row]:
    rows = []
    for customer_id in _ids(rng, count):
        customer = _random_customer(rng, customer_id)
        fields = next((f for ids, f in PLANTED_CUSTOMERS.items() if customer_id in ids), None)
        if fields:
            customer.update({k: v for k, v in fields.items() if k != "stale"})
            if fields.get("stale"):
                customer["last_contact_date"] = (dt.date(2023, 10, 5) + dt.timedelta(days=rng.randrange(25))).isoformat()
        else:
            # Redraw until the customer falls outside every planted selection, so those stay exact.
            while _planted_group(customer) is not None:
                customer = _random_customer(rng, customer_id)
        rows.append(customer)
    rows.sort(key=lambda r: r["last_contact_date"], reverse=True)
    return rows


def generate_tasks(rng: random.Random, count: int = 300) -> list[Row]:
    names = [f"{v} {o}" for v in TASK_VERBS for o in TASK_OBJECTS if f"{v} {o}" != PLANTED_TASK]
    rng.shuffle(names)
    names = [PLANTED_TASK, *names[:count - 1]]  # names are unique, so a task name identifies a task
    rows = []
    for task_id, name in zip(_ids(rng, count), names):
        due = dt.date(2023, 11, 1) + dt.timedelta(days=rng.randrange(92))
        rows.append({"task_id": task_id, "task_name": name,
                     "assigned_to_email": f"carlos.rivera@{DOMAIN}" if name == PLANTED_TASK
                     else f"{rng.choice(ENGINEERS)}@{DOMAIN}",
                     "list_name": rng.choices(TASK_LISTS, weights=(3, 3, 2, 2))[0], "due_date": due.isoformat(),
                     "board": rng.choice(TASK_BOARDS)})
    rows.sort(key=lambda r: r["due_date"])
    return rows


def generate_company(seed: int = 0) -> CompanyState:
    """The synthetic company; the same seed always gives the same rows."""
    rng = random.Random(seed)
    return CompanyState(emails=generate_emails(rng), calendar_events=generate_calendar(rng),
                        analytics=generate_analytics(rng), customers=generate_customers(rng),
                        tasks=generate_tasks(rng), directory=EMPLOYEES)


@functools.lru_cache(maxsize=8)
def _load_cached(data_dir: str | None) -> CompanyState:
    if data_dir is None:
        return generate_company()
    return load_state(data_dir)


def base_state(data_dir: str | Path | None = None) -> CompanyState:
    """The pristine company (synthetic when `data_dir` is None); callers `.copy()` it before mutating."""
    return _load_cached(None if data_dir is None else str(Path(data_dir).expanduser().resolve()))
