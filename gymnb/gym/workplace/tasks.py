"""workplace_assistant environment, task templates: a request in plain words plus the calls that fulfil it.

Each template reads the company to pick its subject (an email, an event, a task, customers) and returns
`(prompt, calls)` with `calls = [(tool_name, arguments)]`, or None when the company offers nothing that fits.
Templates come in three tiers so that a small model finds some reward: direct (every argument is in the
request), lookup (one search or directory call, then one action) and bulk or conditional (several actions, or
an action chosen by what the data says). The ground truth is always the minimal set of mutating calls; the
reward ignores read-only calls, so the lookups a policy needs cost it nothing.

Each template also returns the lookups a solver makes before acting: turns of read-only calls (one model call
each; the calls of a turn run in order) whose outputs hold every id and address the ground truth uses that the
request does not spell out. Lookups + ground truth is the task's reference solution (`gymnb.gym.workplace.
reference` replays and checks it). Lookups draw nothing from `rng`, so the tasks are the same with or without
them.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable

from gymnb.gym.workplace.state import NOW, NOW_DATE, CompanyState, Row
from gymnb.gym.workplace.tools_records import CUSTOMER_STATUSES, PLOT_TYPES, PRODUCTS, TASK_BOARDS, TASK_LISTS

Calls = list[tuple[str, dict]]
Lookups = list[Calls]  # turns of read-only calls, in order
Task = tuple[str, Calls, Lookups]  # (request, ground-truth mutating calls, lookups)
Template = Callable[[CompanyState, random.Random], "Task | None"]
FIND_ADDRESS = "company_directory_find_email_address"
SEARCH_EMAILS = "email_search_emails"
SEARCH_EVENTS = "calendar_search_events"
SEARCH_TASKS = "project_management_search_tasks"
SEARCH_CUSTOMERS = "customer_relationship_manager_search_customers"

SUBJECTS = ("Lunch on Friday", "Offsite logistics", "Quarterly goals", "Client feedback", "Budget approval",
            "Interview schedule", "Design handoff", "Conference travel")
BODIES = ("Thanks, I will take a look tomorrow.", "Can we discuss this at our next sync?",
          "Looks good to me, please go ahead.", "I need a bit more time on this one.",
          "Please send me the latest numbers by Monday.", "Great work, thank you!")
NEW_EVENT_NAMES = ("Risk Management Forum", "Pricing Strategy Session", "Partner Check-in", "Roadmap Review",
                   "Onboarding Walkthrough", "Incident Postmortem")
NEW_TASK_NAMES = ("Prepare launch checklist", "Set up staging alerts", "Audit color contrast", "Draft API changelog",
                  "Clean up feature flags", "Benchmark cold start time")
NEW_CUSTOMERS = ("Dana Whitfield", "Noor Kapoor", "Elliot Hale", "Mira Castell", "Theo Varga", "Ines Duarte")
PLOT_VALUE_WORDS = {"total_visits": "total visits", "session_duration_seconds": "average session duration",
                    "user_engaged": "engaged users", "visits_direct": "direct visits",
                    "visits_referral": "referral visits", "visits_search_engine": "search engine visits",
                    "visits_social_media": "social media visits"}
STATUS_PLURALS = {"Qualified": "qualified prospects", "Won": "won customers", "Lost": "lost customers",
                  "Lead": "leads", "Proposal": "proposals"}


def first_name(address: str) -> str:
    """How a request names a colleague: "Carlos" for carlos.rivera@atlas.com."""
    return address.split(".")[0].split("@")[0].capitalize()


def spoken_date(day: str) -> str:
    date = dt.date.fromisoformat(day[:10])
    return f"{date:%B} {date.day}"


def _latest(rows: list[Row], key: str) -> Row:
    return max(rows, key=lambda r: r[key])


# --- email -------------------------------------------------------------------------------------------------

def email_send_direct(s: CompanyState, rng: random.Random) -> Task:
    to, subject, body = rng.choice(s.directory), rng.choice(SUBJECTS), rng.choice(BODIES)
    prompt = f"Send an email to {to} with the subject '{subject}' and the body '{body}'"
    return prompt, [("email_send_email", {"recipient": to, "subject": subject, "body": body})], []


def email_send_by_name(s: CompanyState, rng: random.Random) -> Task:
    to, subject, body = rng.choice(s.directory), rng.choice(SUBJECTS), rng.choice(BODIES)
    prompt = f"Email {first_name(to)} about '{subject}' and say '{body}'"
    return (prompt, [("email_send_email", {"recipient": to, "subject": subject, "body": body})],
            [[(FIND_ADDRESS, {"name": first_name(to)})]])


def email_reply_last(s: CompanyState, rng: random.Random) -> Task | None:
    email = rng.choice([e for e in s.emails if e["inbox/outbox"] == "inbox"])
    sender, subject = email["sender/recipient"], email["subject"]
    latest = _latest([e for e in s.emails if e["sender/recipient"] == sender and e["subject"] == subject
                      and e["inbox/outbox"] == "inbox"], "sent_datetime")
    body = rng.choice(BODIES)
    prompt = f"Reply to {first_name(sender)}'s last email about '{subject}' with '{body}'"
    # The sender's name and the subject's words match exactly this thread; newest first.
    return (prompt, [("email_reply_email", {"email_id": latest["email_id"], "body": body})],
            [[(SEARCH_EMAILS, {"query": f"{first_name(sender)} {subject}"})]])


def email_forward_latest(s: CompanyState, rng: random.Random) -> Task | None:
    subject = rng.choice([e["subject"] for e in s.emails])
    latest = _latest([e for e in s.emails if e["subject"] == subject], "sent_datetime")
    to = rng.choice([a for a in s.directory if a != latest["sender/recipient"]])
    prompt = f"Forward the most recent email with the subject '{subject}' to {first_name(to)}"
    return (prompt, [("email_forward_email", {"email_id": latest["email_id"], "recipient": to})],
            [[(SEARCH_EMAILS, {"query": subject}), (FIND_ADDRESS, {"name": first_name(to)})]])


def email_delete_last_from(s: CompanyState, rng: random.Random) -> Task | None:
    sender = rng.choice(s.directory)
    received = [e for e in s.emails if e["sender/recipient"] == sender and e["inbox/outbox"] == "inbox"]
    if not received:
        return None
    prompt = f"Delete the last email I got from {first_name(sender)}"
    # The address (not the first name, which also matches other people's emails) finds their thread.
    return (prompt, [("email_delete_email", {"email_id": _latest(received, "sent_datetime")["email_id"]})],
            [[(FIND_ADDRESS, {"name": first_name(sender)})], [(SEARCH_EMAILS, {"query": sender})]])


# --- calendar ----------------------------------------------------------------------------------------------

def _events_on(s: CompanyState, day: str) -> list[Row]:
    return sorted((e for e in s.calendar_events if e["event_start"].startswith(day)), key=lambda e: e["event_start"])


def _pick_busy_day(s: CompanyState, rng: random.Random) -> tuple[str, list[Row]] | None:
    """A day with at least two events at distinct times, so "first" and "last" are unambiguous."""
    days = sorted({e["event_start"][:10] for e in s.calendar_events})
    rng.shuffle(days)
    for day in days:
        events = _events_on(s, day)
        if len(events) >= 2 and events[0]["event_start"] != events[1]["event_start"] \
                and events[-1]["event_start"] != events[-2]["event_start"]:
            return day, events
    return None


def _day_search(day: str) -> tuple[str, dict]:
    """Every event of `day` (listed latest first)."""
    return SEARCH_EVENTS, {"time_min": f"{day} 00:00:00", "time_max": f"{day} 23:59:59", "page_size": 10}


def calendar_create_direct(s: CompanyState, rng: random.Random) -> Task:
    day = dt.date.fromisoformat(NOW_DATE) + dt.timedelta(days=rng.randrange(1, 30))
    if day.weekday() >= 5:  # a weekend becomes the next Monday
        day += dt.timedelta(days=7 - day.weekday())
    start = f"{day.isoformat()} {rng.randrange(9, 16):02d}:{rng.choice((0, 30)):02d}:00"
    name, who, minutes = rng.choice(NEW_EVENT_NAMES), rng.choice(s.directory), rng.choice((30, 60, 90))
    prompt = f"Schedule a {minutes}-minute event called '{name}' with {who} starting at {start}"
    return prompt, [("calendar_create_event", {"event_name": name, "participant_email": who, "event_start": start,
                                               "duration": str(minutes)})], []


def calendar_rename_on_day(s: CompanyState, rng: random.Random) -> Task | None:
    busy = _pick_busy_day(s, rng)
    if busy is None:
        return None
    day, events = busy
    which = rng.choice(("first", "last"))
    event = events[0] if which == "first" else events[-1]
    name = rng.choice(NEW_EVENT_NAMES)
    prompt = f"Can you change the name of the {which} event on {spoken_date(day)} to {name}"
    return (prompt, [("calendar_update_event", {"event_id": event["event_id"], "field": "event_name",
                                                "new_value": name})], [[_day_search(day)]])


def calendar_cancel_next_with(s: CompanyState, rng: random.Random) -> Task | None:
    who = rng.choice(s.directory)
    upcoming = sorted((e for e in s.calendar_events if e["participant_email"] == who and e["event_start"] > NOW),
                      key=lambda e: e["event_start"])
    if not upcoming:
        return None
    prompt = f"Cancel my next meeting with {first_name(who)}"
    # Events match a query by participant address, so the lowercase first name finds them; from now on.
    search = {"query": first_name(who).lower(), "time_min": NOW, "page_size": 10}
    return prompt, [("calendar_delete_event", {"event_id": upcoming[0]["event_id"]})], [[(SEARCH_EVENTS, search)]]


def calendar_change_duration(s: CompanyState, rng: random.Random) -> Task | None:
    busy = _pick_busy_day(s, rng)
    if busy is None:
        return None
    day, events = busy
    event = events[0]
    minutes = rng.choice([m for m in ("30", "45", "60", "90") if m != event["duration"]])
    prompt = f"Change the duration of my first meeting on {spoken_date(day)} to {minutes} minutes"
    return (prompt, [("calendar_update_event", {"event_id": event["event_id"], "field": "duration",
                                                "new_value": minutes})], [[_day_search(day)]])


# --- analytics ---------------------------------------------------------------------------------------------

def _date_range(rng: random.Random) -> tuple[str, str]:
    start = dt.date(2023, 8, 1) + dt.timedelta(days=rng.randrange(100))
    return start.isoformat(), (start + dt.timedelta(days=rng.randrange(7, 21))).isoformat()


def analytics_plot_direct(s: CompanyState, rng: random.Random) -> Task:
    (low, high), value, kind = _date_range(rng), rng.choice(list(PLOT_VALUE_WORDS)), rng.choice(PLOT_TYPES)
    prompt = f"Create a {kind} plot of {PLOT_VALUE_WORDS[value]} between {low} and {high}"
    return prompt, [("analytics_create_plot", {"time_min": low, "time_max": high, "value_to_plot": value,
                                               "plot_type": kind})], []


def analytics_plot_since(s: CompanyState, rng: random.Random) -> Task:
    low = (dt.date(2023, 8, 1) + dt.timedelta(days=rng.randrange(110))).isoformat()
    value, kind = rng.choice(list(PLOT_VALUE_WORDS)), rng.choice(PLOT_TYPES)
    prompt = f"Plot {PLOT_VALUE_WORDS[value]} since {spoken_date(low)} as a {kind} chart"
    return prompt, [("analytics_create_plot", {"time_min": low, "time_max": NOW_DATE, "value_to_plot": value,
                                               "plot_type": kind})], []


def analytics_two_plots(s: CompanyState, rng: random.Random) -> Task:
    (low, high), kind = _date_range(rng), rng.choice(PLOT_TYPES)
    first, second = rng.sample(list(PLOT_VALUE_WORDS), 2)
    prompt = (f"Make {kind} charts of {PLOT_VALUE_WORDS[first]} and then {PLOT_VALUE_WORDS[second]} "
              f"from {low} to {high}")
    return prompt, [("analytics_create_plot", {"time_min": low, "time_max": high, "value_to_plot": v,
                                               "plot_type": kind}) for v in (first, second)], []


def analytics_conditional(s: CompanyState, rng: random.Random) -> Task:
    low, high = _date_range(rng)
    day = rng.choice([v["date_of_visit"] for v in s.analytics if low <= v["date_of_visit"] <= high]
                     or [low])
    visits = sum(1 for v in s.analytics if v["date_of_visit"] == day)
    threshold = max(1, visits + rng.choice((-2, -1, 1, 2)))
    value, kind = ("total_visits", "line") if visits > threshold else ("user_engaged", "bar")
    prompt = (f"If we had more than {threshold} visits on {spoken_date(day)}, make a line plot of total visits "
              f"from {low} to {high}; otherwise make a bar plot of engaged users for the same dates")
    return (prompt, [("analytics_create_plot", {"time_min": low, "time_max": high, "value_to_plot": value,
                                                "plot_type": kind})],
            [[("analytics_total_visits_count", {"time_min": day, "time_max": day})]])


# --- project management ------------------------------------------------------------------------------------

def _assignees(s: CompanyState) -> list[str]:
    return sorted({t["assigned_to_email"] for t in s.tasks})


def pm_move_task(s: CompanyState, rng: random.Random) -> Task:
    task = rng.choice(s.tasks)
    target = rng.choice([name for name in TASK_LISTS if name != task["list_name"]])
    prompt = f"Move the task '{task['task_name']}' to {target}"
    return (prompt, [("project_management_update_task", {"task_id": task["task_id"], "field": "list_name",
                                                         "new_value": target})],
            [[(SEARCH_TASKS, {"task_name": task["task_name"]})]])


def pm_reassign_task(s: CompanyState, rng: random.Random) -> Task:
    task = rng.choice(s.tasks)
    who = rng.choice([a for a in _assignees(s) if a != task["assigned_to_email"]])
    prompt = f"Reassign '{task['task_name']}' to {first_name(who)}"
    return (prompt, [("project_management_update_task", {"task_id": task["task_id"], "field": "assigned_to_email",
                                                         "new_value": who})],
            [[(SEARCH_TASKS, {"task_name": task["task_name"]}), (FIND_ADDRESS, {"name": first_name(who)})]])


def pm_create_direct(s: CompanyState, rng: random.Random) -> Task:
    name, who, board, list_name = (rng.choice(NEW_TASK_NAMES), rng.choice(_assignees(s)), rng.choice(TASK_BOARDS),
                                   rng.choice(TASK_LISTS))
    due = (dt.date.fromisoformat(NOW_DATE) + dt.timedelta(days=rng.randrange(3, 40))).isoformat()
    prompt = f"Create a task '{name}' for {who} on the {board} board in {list_name}, due {due}"
    return prompt, [("project_management_create_task", {"task_name": name, "assigned_to_email": who,
                                                        "list_name": list_name, "due_date": due, "board": board})], []


def pm_delete_task(s: CompanyState, rng: random.Random) -> Task:
    task = rng.choice(s.tasks)
    return (f"Delete the task '{task['task_name']}'", [("project_management_delete_task", {"task_id": task["task_id"]})],
            [[(SEARCH_TASKS, {"task_name": task["task_name"]})]])


def pm_bulk_move(s: CompanyState, rng: random.Random) -> Task | None:
    who, board, source = rng.choice(_assignees(s)), rng.choice(TASK_BOARDS), rng.choice(TASK_LISTS[:3])
    target = TASK_LISTS[TASK_LISTS.index(source) + 1]
    matched = [t for t in s.tasks if t["assigned_to_email"] == who and t["board"] == board
               and t["list_name"] == source]
    if not 1 <= len(matched) <= 5:
        return None
    prompt = f"Move all of {first_name(who)}'s {board} tasks that are in {source} to {target}"
    search = {"assigned_to_email": who, "list_name": source, "board": board}
    return (prompt, [("project_management_update_task", {"task_id": t["task_id"], "field": "list_name",
                                                         "new_value": target}) for t in matched],
            [[(FIND_ADDRESS, {"name": first_name(who)})], [(SEARCH_TASKS, search)]])


# --- customer relationship manager ---------------------------------------------------------------------------

def _customers_of(s: CompanyState, who: str, status: str, product: str) -> list[Row]:
    return [c for c in s.customers if c["assigned_to_email"] == who and c["status"] == status
            and c["product_interest"] == product]


def _pick_customer_group(s: CompanyState, rng: random.Random) -> tuple[str, str, str, list[Row]] | None:
    for _ in range(20):
        who = rng.choice(sorted({c["assigned_to_email"] for c in s.customers}))
        status, product = rng.choice(CUSTOMER_STATUSES), rng.choice(PRODUCTS)
        matched = _customers_of(s, who, status, product)
        if 1 <= len(matched) <= 5:
            return who, status, product, matched
    return None


def _group_search(who: str, status: str, product: str) -> tuple[str, dict]:
    return SEARCH_CUSTOMERS, {"assigned_to_email": who, "status": status, "product_interest": product,
                              "page_size": 10}


def crm_reassign_group(s: CompanyState, rng: random.Random) -> Task | None:
    group = _pick_customer_group(s, rng)
    if group is None:
        return None
    who, status, product, matched = group
    new = rng.choice(sorted({c["assigned_to_email"] for c in s.customers} - {who}))
    prompt = (f"{first_name(new)} is taking over all of {first_name(who)}'s "
              f"{STATUS_PLURALS[status]} that are interested in {product.lower()}. Can you reassign them in the crm?")
    return (prompt, [("customer_relationship_manager_update_customer",
                      {"customer_id": c["customer_id"], "field": "assigned_to_email", "new_value": new})
                     for c in matched],
            [[(FIND_ADDRESS, {"name": first_name(who)}), (FIND_ADDRESS, {"name": first_name(new)})],
             [_group_search(who, status, product)]])


def crm_delete_group(s: CompanyState, rng: random.Random) -> Task | None:
    group = _pick_customer_group(s, rng)
    if group is None:
        return None
    who, status, product, matched = group
    prompt = (f"Delete all of {first_name(who)}'s customers in the {status.lower()} stage who are "
              f"interested in {product.lower()} from the crm")
    return (prompt, [("customer_relationship_manager_delete_customer", {"customer_id": c["customer_id"]})
                     for c in matched],
            [[(FIND_ADDRESS, {"name": first_name(who)})], [_group_search(who, status, product)]])


def crm_close_stale(s: CompanyState, rng: random.Random) -> Task | None:
    product, weeks = rng.choice(PRODUCTS), rng.choice((3, 4, 5, 6))
    cutoff = (dt.datetime.fromisoformat(NOW) - dt.timedelta(weeks=weeks)).strftime("%Y-%m-%d")
    stale = [c for c in s.customers if c["status"] == "Proposal" and c["product_interest"] == product
             and c["last_contact_date"] and c["last_contact_date"] < cutoff]
    if not 1 <= len(stale) <= 6:
        return None
    prompt = (f"Move all customers that haven't responded to a proposal for the {product.lower()} product in "
              f"{weeks} weeks to lost in the crm")
    # "Haven't responded in N weeks": last contact strictly before the cutoff, i.e. on or before the day before.
    last_day = (dt.date.fromisoformat(cutoff) - dt.timedelta(days=1)).isoformat()
    search = {"product_interest": product, "status": "Proposal", "last_contact_date_max": last_day, "page_size": 10}
    return (prompt, [("customer_relationship_manager_update_customer",
                      {"customer_id": c["customer_id"], "field": "status", "new_value": "Lost"}) for c in stale],
            [[(SEARCH_CUSTOMERS, search)]])


def crm_add_direct(s: CompanyState, rng: random.Random) -> Task:
    name, status, product = rng.choice(NEW_CUSTOMERS), rng.choice(CUSTOMER_STATUSES), rng.choice(PRODUCTS)
    who = rng.choice(sorted({c["assigned_to_email"] for c in s.customers}))
    email = name.lower().replace(" ", ".") + "@example.org"
    prompt = (f"Add {name} ({email}) to the crm with status {status}, interested in {product}, "
              f"assigned to {who}")
    return prompt, [("customer_relationship_manager_add_customer",
                     {"customer_name": name, "assigned_to_email": who, "status": status, "customer_email": email,
                      "product_interest": product})], []


TEMPLATES: dict[str, tuple[Template, ...]] = {
    "email": (email_send_direct, email_send_by_name, email_reply_last, email_forward_latest,
              email_delete_last_from),
    "calendar": (calendar_create_direct, calendar_rename_on_day, calendar_cancel_next_with,
                 calendar_change_duration),
    "analytics": (analytics_plot_direct, analytics_plot_since, analytics_two_plots, analytics_conditional),
    "project_management": (pm_move_task, pm_reassign_task, pm_create_direct, pm_delete_task, pm_bulk_move),
    "customer_relationship_manager": (crm_reassign_group, crm_delete_group, crm_close_stale, crm_add_direct),
}
