//! Passwords from files, read at every connect (so a rotated password is picked up by the next
//! connection): libpq's password file (`passfile`, the `.pgpass` format) or a file holding the
//! password alone.

use std::path::{Path, PathBuf};

use leasehold_core::tls::{read_secret_file, CredentialFileError};

/// Where the password comes from, besides the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PasswordSource {
    /// A file of `hostname:port:database:username:password` lines (libpq's `passfile`): the
    /// first line that matches the connection (`*` matches anything; `\:` and `\\` escape).
    PgPass(PathBuf),
    /// A file holding the password alone (its final line break dropped).
    Plain(PathBuf),
}

impl PasswordSource {
    /// The password for `user` on `database` at `host:port`; `None` when a `.pgpass` file has
    /// no matching line.
    ///
    /// # Errors
    ///
    /// When the file cannot be read (never quoting its contents).
    pub fn password(
        &self,
        host: &str,
        port: u16,
        database: &str,
        user: &str,
    ) -> Result<Option<String>, CredentialFileError> {
        match self {
            PasswordSource::Plain(path) => read_secret_file(path).map(Some),
            PasswordSource::PgPass(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| unreadable(path, &e))?;
                let port = port.to_string();
                Ok(text.lines().find_map(|line| {
                    let fields = split(line)?;
                    let wanted = [host, port.as_str(), database, user];
                    let matches = fields[..4]
                        .iter()
                        .zip(wanted)
                        .all(|(field, value)| field == "*" || field == value);
                    matches.then(|| fields[4].clone())
                }))
            }
        }
    }
}

fn unreadable(path: &Path, error: &std::io::Error) -> CredentialFileError {
    CredentialFileError::Unreadable {
        what: "password",
        path: path.to_owned(),
        reason: error.to_string(),
    }
}

/// The five fields of a `.pgpass` line, unescaped; `None` for comments, blank lines and lines
/// of fewer fields.
fn split(line: &str) -> Option<Vec<String>> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut()?.push(next);
                }
            }
            // The password, the fifth field, may hold unescaped colons.
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(
            &path,
            "# comment\n\
             db.example:5432:app:leasehold:first\n\
             127.0.0.1:*:*:leasehold:p\\:ss:word\n\
             *:*:*:*:fallback\n",
        )
        .unwrap();
        let source = PasswordSource::PgPass(path);
        let get = |host, port, db, user| source.password(host, port, db, user).unwrap();
        assert_eq!(
            get("db.example", 5432, "app", "leasehold").as_deref(),
            Some("first")
        );
        assert_eq!(
            get("127.0.0.1", 6000, "postgres", "leasehold").as_deref(),
            Some("p:ss:word")
        );
        assert_eq!(get("other", 1, "x", "y").as_deref(), Some("fallback"));
        let missing = PasswordSource::PgPass(dir.path().join("missing"));
        assert!(missing.password("h", 1, "d", "u").is_err());
    }

    #[test]
    fn short_lines_match_nothing() {
        assert_eq!(split("a:b:c:d"), None);
        assert_eq!(split("   "), None);
        assert_eq!(
            split("a:b:c:d:e").map(|f| f[4].clone()).as_deref(),
            Some("e")
        );
    }
}
