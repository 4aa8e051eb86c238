//! The SQL this backend runs: the schema it creates, and one statement per operation.
//!
//! Identifiers (schema, table) are validated at configuration time (`[a-z_][a-z0-9_]*`) and
//! always double-quoted; values always travel as parameters.

/// The names of everything the backend uses in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    /// `"schema"`.
    pub schema: String,
    /// `"schema"."table"`: one row per lock.
    pub table: String,
    /// `"schema"."table_deleted"`: the last live lease of each lock an operator deleted.
    pub deleted: String,
    /// `"schema"."table_token"`: the token sequence.
    pub sequence: String,
    /// `"schema"."table_changed"()`: the trigger function.
    pub trigger_fn: String,
    /// `"schema"."table_acquire"(name, holder, lease_ms)`.
    pub acquire_fn: String,
    /// The bare trigger name.
    pub trigger: String,
    /// The bare truncate trigger name.
    pub truncate_trigger: String,
    /// The `LISTEN`/`NOTIFY` channel: `schema.table`.
    pub channel: String,
    /// The first key of the per-lock advisory locks (`hashtext` of the table's name), so
    /// two tables in one database do not serialize each other.
    pub lock_class: String,
}

impl Names {
    pub fn new(schema: &str, table: &str) -> Self {
        let q = |name: &str| format!("\"{schema}\".\"{name}\"");
        Self {
            schema: format!("\"{schema}\""),
            table: q(table),
            deleted: q(&format!("{table}_deleted")),
            sequence: q(&format!("{table}_token")),
            trigger_fn: q(&format!("{table}_changed")),
            acquire_fn: q(&format!("{table}_acquire")),
            trigger: format!("\"{table}_changed\""),
            truncate_trigger: format!("\"{table}_truncated\""),
            channel: format!("{schema}.{table}"),
            lock_class: format!("hashtext('leasehold:{schema}.{table}')"),
        }
    }
}

/// The longest remaining time reported (a foreign row may say `infinity`): 365 days, the
/// longest duration the elector accepts.
const MAX_REMAINING_MS: i64 = 365 * 24 * 3600 * 1000;

/// Milliseconds since the epoch of timestamp `t` (0 when infinite).
fn epoch_ms(t: &str) -> String {
    format!("(CASE WHEN isfinite({t}) THEN (extract(epoch from {t}) * 1000)::bigint ELSE 0 END)")
}

/// Milliseconds from now (the server's clock) until `t`, in `[0, MAX_REMAINING_MS]`.
fn remaining_ms(t: &str) -> String {
    format!(
        "(CASE WHEN {t} = 'infinity' THEN {MAX_REMAINING_MS}::bigint \
          WHEN {t} = '-infinity' THEN 0::bigint \
          ELSE LEAST({MAX_REMAINING_MS}, GREATEST(0, \
               ceil(extract(epoch from ({t} - clock_timestamp())) * 1000)))::bigint END)"
    )
}

/// The columns every statement returns, in this order (see `record::Row`).
fn columns(prefix: &str) -> String {
    format!(
        "{p}holder, {p}token, {p}lease_ms, {}, {}, {p}transitions, {}, coalesce({p}preferred, '')",
        epoch_ms(&format!("{prefix}acquired_at")),
        epoch_ms(&format!("{prefix}renewed_at")),
        remaining_ms(&format!("{prefix}expires_at")),
        p = prefix,
    )
}

/// The DDL, idempotent: run in one transaction under an advisory lock, so that many
/// processes starting at once do not race on `CREATE ... IF NOT EXISTS`.
pub(crate) fn setup(n: &Names) -> String {
    let Names {
        schema,
        table,
        deleted,
        sequence,
        trigger_fn,
        acquire_fn: _,
        trigger,
        truncate_trigger,
        channel,
        lock_class: _,
    } = n;
    let channel_lit = literal(channel);
    let schema_lit = literal(schema);
    let version_lit = literal(VERSION);
    format!(
        r#"
DO $leasehold$ BEGIN
    IF to_regnamespace({schema_lit}) IS NULL THEN CREATE SCHEMA {schema}; END IF;
END $leasehold$;
CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint MINVALUE 1;
CREATE TABLE IF NOT EXISTS {table} (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    token       bigint NOT NULL,
    lease_ms    bigint NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    transitions bigint NOT NULL DEFAULT 0,
    preferred   text NOT NULL DEFAULT ''
);
-- v1 tables had no transfer target.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS preferred text NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS {deleted} (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    token       bigint NOT NULL,
    lease_ms    bigint NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    transitions bigint NOT NULL DEFAULT 0
);
CREATE OR REPLACE FUNCTION {trigger_fn}() RETURNS trigger LANGUAGE plpgsql AS $leasehold$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO {deleted} AS d
            SELECT t.name, t.holder, t.token, t.lease_ms, t.acquired_at, t.renewed_at,
                   LEAST(t.expires_at, clock_timestamp() + t.lease_ms * interval '1 millisecond'),
                   t.transitions
            FROM {table} t
            WHERE t.expires_at > clock_timestamp() AND t.holder <> '' AND t.token >= 1
              AND t.lease_ms >= 1
            ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, token = EXCLUDED.token,
                lease_ms = EXCLUDED.lease_ms, acquired_at = EXCLUDED.acquired_at,
                renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at,
                transitions = EXCLUDED.transitions;
        PERFORM pg_notify({channel_lit}, json_build_object('all', true)::text);
        RETURN NULL;
    ELSIF TG_OP = 'DELETE' THEN
        -- A live lease that an operator deletes is kept here until it ends (at most one
        -- lease from now): acquires respect it. Rows that are not leasehold records are not.
        IF OLD.expires_at > clock_timestamp() AND OLD.holder <> '' AND OLD.token >= 1
           AND OLD.lease_ms >= 1 THEN
            INSERT INTO {deleted} AS d VALUES (OLD.name, OLD.holder, OLD.token, OLD.lease_ms,
                OLD.acquired_at, OLD.renewed_at,
                LEAST(OLD.expires_at, clock_timestamp() + OLD.lease_ms * interval '1 millisecond'),
                OLD.transitions)
                ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,
                    token = EXCLUDED.token, lease_ms = EXCLUDED.lease_ms,
                    acquired_at = EXCLUDED.acquired_at, renewed_at = EXCLUDED.renewed_at,
                    expires_at = EXCLUDED.expires_at, transitions = EXCLUDED.transitions;
        END IF;
        PERFORM pg_notify({channel_lit}, json_build_object('lock', OLD.name, 'gone', true)::text);
        RETURN OLD;
    END IF;
    PERFORM pg_notify({channel_lit}, json_build_object(
        'lock', NEW.name, 'holder', NEW.holder, 'token', NEW.token, 'lease_ms', NEW.lease_ms,
        'acquired_ms', {new_acquired},
        'renewed_ms', {new_renewed},
        'transitions', NEW.transitions,
        'remaining_ms', {new_remaining},
        'preferred', NEW.preferred
    )::text);
    RETURN NEW;
END
$leasehold$;
CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {trigger_fn}();
CREATE OR REPLACE TRIGGER {truncate_trigger} BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {trigger_fn}();
{acquire}
COMMENT ON TABLE {table} IS {version_lit};
"#,
        acquire = acquire_function(n),
        new_acquired = epoch_ms("NEW.acquired_at"),
        new_renewed = epoch_ms("NEW.renewed_at"),
        new_remaining = remaining_ms("NEW.expires_at"),
    )
}

/// What the setup leaves as the table's comment; a table that has it needs no setup.
pub(crate) const VERSION: &str = "leasehold lease table v2";

/// Whether the setup has run (`$1`: the quoted table name, `$2`: [`VERSION`]).
pub(crate) const SET_UP: &str =
    "SELECT coalesce(obj_description(to_regclass($1), 'pg_class') = $2, false)";

/// The acquire function: `(name, holder, lease_ms)`, one row of a status (`acquired`,
/// `held`, `malformed`) and the record as in `columns`.
///
/// Grants of one lock are serialized by a per-lock advisory lock taken first, in the
/// function's own transaction (so it also works through a transaction-mode pooler): the token
/// is drawn from the sequence, and the row written, only while that lock is held, so tokens
/// reach the table in the order the grants happen, whatever an operator deletes meanwhile.
/// (Drawing it when the statement starts, as an `INSERT ... VALUES (nextval(...))` does, lets
/// a slow statement insert a lower token after a faster one was granted a higher.)
fn acquire_function(n: &Names) -> String {
    let Names {
        table,
        deleted,
        sequence,
        acquire_fn,
        lock_class,
        ..
    } = n;
    format!(
        r#"
-- v2 returns the transfer target too: a new return type needs a new function.
DROP FUNCTION IF EXISTS {acquire_fn}(text, text, bigint);
CREATE FUNCTION {acquire_fn}(p_name text, p_holder text, p_lease_ms bigint)
RETURNS TABLE (status text, holder text, token bigint, lease_ms bigint, acquired_ms bigint,
               renewed_ms bigint, transitions bigint, remaining_ms bigint, preferred text)
LANGUAGE plpgsql VOLATILE AS $leasehold$
#variable_conflict use_column
DECLARE
    r {table}%ROWTYPE;
    now_ timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock({lock_class}, hashtext(p_name));
    now_ := clock_timestamp();
    SELECT * INTO r FROM {table} t WHERE t.name = p_name FOR UPDATE;
    IF FOUND THEN
        IF r.expires_at > now_ AND NOT (r.token >= 1 AND r.lease_ms >= 1) THEN
            status := 'malformed';
        ELSIF r.expires_at > now_ AND r.holder <> '' AND r.holder <> p_holder THEN
            status := 'held';
        ELSIF r.expires_at > now_ AND r.holder = '' AND r.preferred <> ''
              AND r.preferred <> p_holder THEN
            -- A transfer reserved it for another candidate.
            status := 'held';
        ELSE
            UPDATE {table} t SET holder = p_holder, token = nextval('{sequence}'), preferred = '',
                lease_ms = p_lease_ms, acquired_at = now_, renewed_at = now_,
                expires_at = now_ + p_lease_ms * interval '1 millisecond',
                transitions = t.transitions + (t.holder <> p_holder)::int
            WHERE t.name = p_name
            RETURNING t.* INTO r;
            status := 'acquired';
        END IF;
    ELSE
        -- Deleted by an operator while live: respected until its lease ends.
        SELECT * INTO r FROM {deleted} d WHERE d.name = p_name;
        IF FOUND AND r.expires_at > now_ AND r.holder <> p_holder THEN
            status := 'held';
        ELSE
            DELETE FROM {deleted} d WHERE d.name = p_name;
            INSERT INTO {table} AS t VALUES (p_name, p_holder, nextval('{sequence}'),
                p_lease_ms, now_, now_, now_ + p_lease_ms * interval '1 millisecond',
                coalesce(r.transitions + (r.holder <> p_holder)::int, 0), '')
            RETURNING t.* INTO r;
            status := 'acquired';
        END IF;
    END IF;
    holder := r.holder;
    token := r.token;
    lease_ms := r.lease_ms;
    acquired_ms := {acquired};
    renewed_ms := {renewed};
    transitions := r.transitions;
    remaining_ms := {remaining};
    preferred := coalesce(r.preferred, '');
    RETURN NEXT;
END
$leasehold$;
"#,
        acquired = epoch_ms("r.acquired_at"),
        renewed = epoch_ms("r.renewed_at"),
        remaining = remaining_ms("r.expires_at"),
    )
}

/// Acquire: `$1` lock, `$2` holder, `$3` lease in ms. One row: the status and the record.
pub(crate) fn acquire(n: &Names) -> String {
    format!("SELECT * FROM {}($1, $2, $3)", n.acquire_fn)
}

/// Renew: `$1` lock, `$2` holder, `$3` token, `$4` lease in ms. One row when renewed.
pub(crate) fn renew(n: &Names) -> String {
    format!(
        "UPDATE {table} SET renewed_at = clock_timestamp(), lease_ms = $4,
                expires_at = clock_timestamp() + $4 * interval '1 millisecond'
         WHERE name = $1 AND holder = $2 AND token = $3
         RETURNING {columns}",
        table = n.table,
        columns = columns("")
    )
}

/// Release: `$1` lock, `$2` holder, `$3` token. One row when released.
pub(crate) fn release(n: &Names) -> String {
    format!(
        "UPDATE {table} SET holder = '', renewed_at = clock_timestamp(),
                expires_at = clock_timestamp()
         WHERE name = $1 AND holder = $2 AND token = $3
         RETURNING 1",
        table = n.table
    )
}

/// Transfer: `$1` lock, `$2` holder, `$3` token, `$4` target, `$5` lease in ms. One row when
/// handed over: the row is released and reserved for the target for one lease.
pub(crate) fn transfer(n: &Names) -> String {
    format!(
        "UPDATE {table} SET holder = '', preferred = $4, renewed_at = clock_timestamp(),
                expires_at = clock_timestamp() + $5 * interval '1 millisecond'
         WHERE name = $1 AND holder = $2 AND token = $3
         RETURNING 1",
        table = n.table
    )
}

/// Request a transfer: `$1` lock, `$2` target. Marks a live, held row (`preferred` on a held
/// row asks its holder to hand over); the row as it is after, if any.
pub(crate) fn request_transfer(n: &Names) -> String {
    format!(
        "WITH asked AS (
             UPDATE {table} SET preferred = $2
             WHERE name = $1 AND holder <> '' AND expires_at > clock_timestamp()
             RETURNING *)
         SELECT {columns} FROM asked
         UNION ALL
         SELECT {columns} FROM {table} WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM asked)",
        table = n.table,
        columns = columns("")
    )
}

/// Read: `$1` lock. No row when the lock was never taken (or was deleted).
pub(crate) fn read(n: &Names) -> String {
    format!(
        "SELECT {columns} FROM {table} WHERE name = $1",
        table = n.table,
        columns = columns("")
    )
}

/// A string literal (for the channel name in the trigger function).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
