"""workplace_assistant environment, state: the simulated company one rollout acts on.

Five tables and a read-only company directory, with NeMo Gym's CSV column names so that its real data files
load unchanged (`load_state(data_dir)`) and our synthetic company can be exported for it (`write_state`).
Rows are plain dicts of strings; an empty CSV cell is `None` (pandas' NaN in NeMo Gym), and the analytics
`user_engaged` column is a bool. Table order is row order: deletes keep the order of the rest, new rows are
appended, exactly as NeMo Gym's DataFrames behave, because the reward compares tables row by row.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
from pathlib import Path

from gymnb.core.errors import ConfigError

NOW = "2023-11-30 23:59:00"  # the simulated "now": every task and the system prompt assume it
NOW_DATE = NOW[:10]

# table attribute -> (NeMo Gym file name, columns in file order)
TABLE_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "emails": ("emails.csv", ("email_id", "inbox/outbox", "sender/recipient", "subject", "sent_datetime", "body")),
    "calendar_events": ("calendar_events.csv",
                        ("event_id", "event_name", "participant_email", "event_start", "duration")),
    "analytics": ("analytics_data.csv", ("date_of_visit", "visitor_id", "page_views", "session_duration_seconds",
                                         "traffic_source", "user_engaged")),
    "customers": ("customer_relationship_manager_data.csv",
                  ("customer_id", "assigned_to_email", "customer_name", "customer_email", "customer_phone",
                   "last_contact_date", "product_interest", "status", "follow_up_by", "notes")),
    "tasks": ("project_tasks.csv", ("task_id", "task_name", "assigned_to_email", "list_name", "due_date", "board")),
}
DIRECTORY_FILE = "email_addresses.csv"  # one address per line, no header
PLOT_COLUMNS = ("file_path",)

# What the reward compares (analytics visits and the directory are read-only, so they never differ).
MUTABLE_TABLES = ("calendar_events", "emails", "plots", "tasks", "customers")
# Columns whose case is meaningful (their values are enumerations); every other string is compared lowercased.
CASE_SENSITIVE_COLUMNS = frozenset({"status", "list_name", "board"})

Row = dict[str, object]


@dataclasses.dataclass
class CompanyState:
    """One session's company. Mutable tables are lists of row dicts; `analytics` and `directory` are shared."""

    emails: list[Row]
    calendar_events: list[Row]
    analytics: list[Row]
    customers: list[Row]
    tasks: list[Row]
    directory: tuple[str, ...]
    plots: list[Row] = dataclasses.field(default_factory=list)

    def copy(self) -> CompanyState:
        """A fresh state: mutable tables copied row by row, read-only ones shared (cheap for many sessions)."""
        return CompanyState(
            emails=[dict(r) for r in self.emails],
            calendar_events=[dict(r) for r in self.calendar_events],
            analytics=self.analytics,
            customers=[dict(r) for r in self.customers],
            tasks=[dict(r) for r in self.tasks],
            directory=self.directory,
            plots=[dict(r) for r in self.plots],
        )

    def differing_tables(self, other: CompanyState) -> list[str]:
        """Mutable tables that differ from `other`'s: rows in order, strings compared lowercased except enums."""
        return [name for name in MUTABLE_TABLES if not _tables_equal(getattr(self, name), getattr(other, name))]

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in (*TABLE_FILES, "plots")} | {
            "directory": len(self.directory)}


def _normalize_row(row: Row) -> Row:
    return {key: value.lower() if isinstance(value, str) and key not in CASE_SENSITIVE_COLUMNS else value
            for key, value in row.items()}


def _tables_equal(left: list[Row], right: list[Row]) -> bool:
    if left == right:  # the common case, and cheap
        return True
    return len(left) == len(right) and all(
        a == b or _normalize_row(a) == _normalize_row(b) for a, b in zip(left, right))


def next_id(rows: list[Row], key: str) -> str:
    """max existing id + 1 as an 8-digit zero-padded string ("00000001" for an empty table)."""
    ids = [int(r[key]) for r in rows if isinstance(r.get(key), str) and r[key].isdigit()]
    return str(max(ids, default=0) + 1).zfill(8)


def find_row(rows: list[Row], key: str, value: object) -> Row | None:
    return next((row for row in rows if row[key] == value), None)


def delete_row(rows: list[Row], key: str, value: object, noun: str) -> str:
    """Remove the row whose `key` is `value` in place; NeMo Gym's "<Noun> not found." / "... deleted" text."""
    if find_row(rows, key, value) is None:
        return f"{noun} not found."
    rows[:] = [row for row in rows if row[key] != value]
    return f"{noun} deleted successfully."


def parse_time(text: str) -> dt.datetime:
    """A date or date-time as the tools accept it ("2023-11-30", "2023-11-30 09:00:00", ISO 'T' forms)."""
    return dt.datetime.fromisoformat(text.strip())


def paginate(items: list, page: int, page_size: int, label: str) -> dict:
    """NeMo Gym's pagination: a page number out of range is clamped to the first or last page."""
    total = len(items)
    total_pages = (total + page_size - 1) // page_size
    page = max(1, min(page, total_pages)) if total_pages > 0 else 1
    start = (page - 1) * page_size
    return {label: items[start:start + page_size],
            "pagination": {f"total_{label}": total, "page": page, "page_size": page_size,
                           "total_pages": total_pages}}


def find_data_file(data_dir: Path, file_name: str) -> Path:
    """Look in data_dir and in NeMo Gym's own layout (csv_data/processed, csv_data/raw)."""
    for candidate in (data_dir / file_name, data_dir / "processed" / file_name, data_dir / "raw" / file_name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"workplace_assistant data_dir {data_dir}: no {file_name} (looked in the directory and in "
                      f"its processed/ and raw/ subdirectories); point data_dir at NeMo Gym's csv_data folder "
                      f"or at a folder written by gymnb.gym.workplace.state.write_state")


def read_table(path: Path, columns: tuple[str, ...]) -> list[Row]:
    """Rows of one CSV; its header must hold every expected column (extra columns are an error too)."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        missing = [c for c in columns if c not in header]
        extra = [c for c in header if c not in columns]
        if missing or extra:
            raise ConfigError(f"{path}: header {list(header)} does not match NeMo Gym's {list(columns)} "
                              f"(missing {missing}, unexpected {extra})")
        rows = []
        for line_no, record in enumerate(reader, start=2):
            if None in record:
                raise ConfigError(f"{path}, line {line_no}: more cells than the header has columns")
            rows.append({c: (record[c] if record[c] not in ("", None) else None) for c in columns})
    return rows


def load_state(data_dir: str | Path) -> CompanyState:
    """Load the five tables and the directory from a folder of NeMo Gym CSV files."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise ConfigError(f"workplace_assistant data_dir {data_dir} is not a directory")
    tables = {name: read_table(find_data_file(data_dir, file_name), columns)
              for name, (file_name, columns) in TABLE_FILES.items()}
    for row in tables["analytics"]:
        row["user_engaged"] = row["user_engaged"] == "True"
    directory_path = find_data_file(data_dir, DIRECTORY_FILE)
    directory = tuple(line.strip() for line in directory_path.read_text(encoding="utf-8").splitlines()
                      if line.strip())
    return CompanyState(directory=directory, **tables)


def write_state(state: CompanyState, out_dir: str | Path) -> Path:
    """Write the state as NeMo Gym CSV files (flat layout) that `load_state` and NeMo Gym both read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (file_name, columns) in TABLE_FILES.items():
        with (out_dir / file_name).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            for row in getattr(state, name):
                writer.writerow(["" if row[c] is None else str(row[c]) for c in columns])
    (out_dir / DIRECTORY_FILE).write_text("".join(f"{address}\n" for address in state.directory), encoding="utf-8")
    return out_dir
