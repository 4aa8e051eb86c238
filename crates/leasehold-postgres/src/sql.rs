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

/// The columns every statement returns, in this order (see `record::Row`).
const COLUMNS: &str = "holder, token, lease_ms, \
     (extract(epoch from acquired_at) * 1000)::bigint, \
     (extract(epoch from renewed_at) * 1000)::bigint, \
     transitions, \
     GREATEST(0, ceil(extract(epoch from (expires_at - clock_timestamp())) * 1000))::bigint";

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
        lock_class,
    } = n;
    let channel_lit = literal(channel);
    format!(
        r#"
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint MINVALUE 1;
CREATE TABLE IF NOT EXISTS {table} (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    token       bigint NOT NULL,
    lease_ms    bigint NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    transitions bigint NOT NULL DEFAULT 0
);
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
            SELECT * FROM {table} t WHERE t.expires_at > clock_timestamp() AND t.holder <> ''
            ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, token = EXCLUDED.token,
                lease_ms = EXCLUDED.lease_ms, acquired_at = EXCLUDED.acquired_at,
                renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at,
                transitions = EXCLUDED.transitions;
        PERFORM pg_notify({channel_lit}, json_build_object('all', true)::text);
        RETURN NULL;
    ELSIF TG_OP = 'DELETE' THEN
        IF OLD.expires_at > clock_timestamp() AND OLD.holder <> '' THEN
            INSERT INTO {deleted} AS d VALUES (OLD.*)
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
        'acquired_ms', (extract(epoch from NEW.acquired_at) * 1000)::bigint,
        'renewed_ms', (extract(epoch from NEW.renewed_at) * 1000)::bigint,
        'transitions', NEW.transitions,
        'remaining_ms', GREATEST(0, ceil(extract(epoch from (NEW.expires_at - clock_timestamp())) * 1000))::bigint
    )::text);
    RETURN NEW;
END
$leasehold$;
CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {trigger_fn}();
CREATE OR REPLACE TRIGGER {truncate_trigger} BEFORE TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {trigger_fn}();
{acquire}
"#,
        acquire = acquire_function(n),
    )
    .replace("{lock_class}", lock_class)
}

/// The acquire function (see [`acquire`]).
fn acquire_function(_n: &Names) -> String {
    String::new()
}

/// Acquire: `$1` lock, `$2` holder, `$3` lease in ms. Returns one row: a status (`acquired`,
/// `held`, `malformed`, `vacant`) and the record (see [`COLUMNS`]).
pub(crate) fn acquire(n: &Names) -> String {
    let Names {
        table, sequence, ..
    } = n;
    // NAIVE: the token is drawn when the statement starts.
    format!(
        "WITH g AS (
            INSERT INTO {table} AS t (name, holder, token, lease_ms, acquired_at, renewed_at,
                                      expires_at, transitions)
            VALUES ($1, $2, nextval('{seq}'), $3, clock_timestamp(), clock_timestamp(),
                    clock_timestamp() + $3 * interval '1 millisecond', 0)
            ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, token = EXCLUDED.token,
                lease_ms = EXCLUDED.lease_ms, acquired_at = EXCLUDED.acquired_at,
                renewed_at = EXCLUDED.renewed_at, expires_at = EXCLUDED.expires_at,
                transitions = t.transitions + (t.holder <> EXCLUDED.holder)::int
            WHERE (t.token >= 1 AND t.lease_ms >= 1 AND
                   (t.holder = '' OR t.holder = EXCLUDED.holder))
               OR t.expires_at <= clock_timestamp()
            RETURNING {COLUMNS}
        )
        SELECT 'acquired'::text, * FROM g",
        seq = sequence,
    )
}

/// Renew: `$1` lock, `$2` holder, `$3` token, `$4` lease in ms. One row when renewed.
pub(crate) fn renew(n: &Names) -> String {
    format!(
        "UPDATE {table} SET renewed_at = clock_timestamp(), lease_ms = $4,
                expires_at = clock_timestamp() + $4 * interval '1 millisecond'
         WHERE name = $1 AND holder = $2 AND token = $3
         RETURNING {COLUMNS}",
        table = n.table
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

/// Read: `$1` lock. No row when the lock was never taken (or was deleted).
pub(crate) fn read(n: &Names) -> String {
    format!(
        "SELECT {COLUMNS} FROM {table} WHERE name = $1",
        table = n.table
    )
}

/// A string literal (for the channel name in the trigger function).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
