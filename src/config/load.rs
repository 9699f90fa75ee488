//! The layers (flags, environment, file, defaults) and how they merge, key by key, into
//! [`Values`]: each value parsed by its key's [`Kind`] and remembering its [`Origin`].
//!
//! Every value a layer gives is parsed where it is read, so a mistake names the flag, the
//! variable or the file's key that holds it. Every key of the file is parsed even when a flag or
//! a variable overrides it, so that a file is judged whole; the environment is read only for the
//! keys no flag gives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::table::{KEYS, Key, Kind, Scope};
use super::{ConfigError, Cors, LogFormat, Mode, Origin, RestartPolicy, Secret, parse_duration};

/// The flags as given on the command line, as text; `cli` fills it, `load` parses it.
#[derive(Clone, Default)]
pub struct Flags {
    /// `--config`: the file to read.
    pub config: Option<PathBuf>,
    /// Key name to the values given (several for a repeated or comma-separated flag).
    values: BTreeMap<&'static str, Vec<String>>,
}

impl Flags {
    /// Flags that name only a file (what `gateway config check FILE` judges).
    pub fn file(path: &Path) -> Self {
        Flags {
            config: Some(path.to_path_buf()),
            values: BTreeMap::new(),
        }
    }

    /// Records the values given for a key; unknown names are ignored (clap only passes keys of
    /// the table).
    pub fn set<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, name: &str, values: I) {
        if let Some(key) = super::table::key(name) {
            self.values
                .insert(key.name, values.into_iter().map(Into::into).collect());
        }
    }

    fn get(&self, name: &str) -> Option<&[String]> {
        self.values
            .get(name)
            .map(Vec::as_slice)
            .filter(|values| !values.is_empty())
    }
}

impl std::fmt::Debug for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        map.entry(&"config", &self.config);
        for (name, values) in &self.values {
            if super::table::key(name).is_some_and(|key| key.secret) {
                map.entry(name, &"[redacted]");
            } else {
                map.entry(name, values);
            }
        }
        map.finish()
    }
}

/// A parsed value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Text(String),
    Duration(Duration),
    Integer(u64),
    Bool(bool),
    Texts(Vec<String>),
    Integers(Vec<i32>),
}

/// A field's type, filled from the value of its key (see `table::field!`). `None`: the value is
/// not of the field's type, a mistake in the table that its tests show.
pub(super) trait FromValue: Sized {
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for Duration {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Duration(duration) => Some(*duration),
            _ => None,
        }
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(value) => Some(*value),
            _ => None,
        }
    }
}

macro_rules! from_integer {
    ($($int:ty),+) => {$(
        impl FromValue for $int {
            fn from_value(value: &Value) -> Option<Self> {
                match value {
                    Value::Integer(number) => <$int>::try_from(*number).ok(),
                    _ => None,
                }
            }
        }
    )+};
}

from_integer!(u16, u32, u64);

impl FromValue for Option<u32> {
    fn from_value(value: &Value) -> Option<Self> {
        u32::from_value(value).map(Some)
    }
}

impl FromValue for Option<u16> {
    fn from_value(value: &Value) -> Option<Self> {
        u16::from_value(value).map(Some)
    }
}

impl FromValue for String {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(text) => Some(text.clone()),
            _ => None,
        }
    }
}

impl FromValue for Option<Secret> {
    fn from_value(value: &Value) -> Option<Self> {
        String::from_value(value).map(|text| Some(Secret(text)))
    }
}

impl FromValue for LogFormat {
    fn from_value(value: &Value) -> Option<Self> {
        String::from_value(value)?.parse().ok()
    }
}

impl FromValue for RestartPolicy {
    fn from_value(value: &Value) -> Option<Self> {
        String::from_value(value)?.parse().ok()
    }
}

impl FromValue for Vec<String> {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Texts(texts) => Some(texts.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<Secret> {
    fn from_value(value: &Value) -> Option<Self> {
        Some(
            Vec::<String>::from_value(value)?
                .into_iter()
                .map(Secret)
                .collect(),
        )
    }
}

/// CORS origins: none leaves CORS off, `*` among them allows any.
impl FromValue for Option<Cors> {
    fn from_value(value: &Value) -> Option<Self> {
        let origins = Vec::<String>::from_value(value)?;
        Some(if origins.is_empty() {
            None
        } else if origins.iter().any(|origin| origin == "*") {
            Some(Cors::AnyOrigin)
        } else {
            Some(Cors::Origins(origins))
        })
    }
}

/// `NAME=VALUE` pairs; `validate` has refused any other entry before a field is filled.
impl FromValue for Vec<(String, String)> {
    fn from_value(value: &Value) -> Option<Self> {
        let pairs = Vec::<String>::from_value(value)?
            .iter()
            .filter_map(|pair| pair.split_once('='))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Some(pairs)
    }
}

impl FromValue for Vec<i32> {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Integers(numbers) => Some(numbers.clone()),
            _ => None,
        }
    }
}

/// Every key's value (or none, for a key without a default that nobody set) and where it came
/// from, plus every mistake found on the way.
pub(super) struct Values {
    values: BTreeMap<&'static str, (Option<Value>, Origin)>,
    pub(super) file: Option<PathBuf>,
    /// How many keys the file set, known or not.
    pub(super) file_keys: usize,
    /// The keys the file sets to a value other than the one a flag or a variable gives, which
    /// wins, with where that came from.
    pub(super) overridden: Vec<(&'static str, Origin)>,
    pub(super) errors: Vec<ConfigError>,
}

impl Values {
    pub(super) fn origin(&self, name: &str) -> Origin {
        self.values
            .get(name)
            .map_or(Origin::Default, |(_, origin)| origin.clone())
    }

    pub(super) fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name).and_then(|(value, _)| value.as_ref())
    }

    /// Whether the key was set by a flag, a variable or the file.
    pub(super) fn is_set(&self, name: &str) -> bool {
        self.origin(name) != Origin::Default
    }

    /// A key's value as the type its field has; `None` when nobody set a key without default.
    pub(super) fn value<T: FromValue>(&self, name: &str) -> Option<T> {
        self.get(name).and_then(T::from_value)
    }
}

/// Reads the layers and merges them: flags > environment > file > defaults. A file that cannot
/// be read or parsed is the one error.
pub(super) fn merge(
    flags: &Flags,
    mode: Mode,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Values, ConfigError> {
    let mut errors = Vec::new();
    let (path, mut table) = match &flags.config {
        Some(path) => (Some(path.clone()), read_file(path)?),
        None => (None, toml::Table::new()),
    };
    let file_keys = table.len();
    let mut values = BTreeMap::new();
    let mut overridden = Vec::new();
    for key in KEYS {
        // The file's value is parsed whatever overrides it.
        let file_value = table.remove(key.name).and_then(|raw| {
            let origin = Origin::File(path.clone().unwrap_or_default());
            parse_toml(key, &raw)
                .map_err(|message| errors.push(error(key, &origin, message)))
                .ok()
                .flatten()
                .map(|value| (value, origin))
        });
        let takes_flags = match mode {
            Mode::Check => false,
            Mode::Standalone => key.scope == Scope::All,
            Mode::Serve => true,
        };
        let given = takes_flags
            .then(|| {
                let flag = flags
                    .get(key.name)
                    .map(|texts| (texts.to_vec(), Origin::Flag(key.flag_name())));
                // An empty variable counts as unset (`Environment=GATEWAY_PORT=` in a unit).
                flag.or_else(|| {
                    key.env.iter().find_map(|name| {
                        let text = env(name).filter(|text| !text.is_empty())?;
                        Some((split_env(key, text), Origin::Env((*name).to_string())))
                    })
                })
            })
            .flatten();
        let given = given.and_then(|(texts, origin)| {
            parse_texts(key, &texts)
                .map_err(|message| errors.push(error(key, &origin, message)))
                .ok()
                .flatten()
                .map(|value| (value, origin))
        });
        if let (Some((value, origin)), Some((in_file, _))) = (&given, &file_value)
            && value != in_file
        {
            overridden.push((key.name, origin.clone()));
        }
        let chosen = given.or(file_value).or_else(|| {
            let default = key.default?;
            let value = parse_texts(key, &[default.to_string()]).ok().flatten()?;
            Some((value, Origin::Default))
        });
        let (value, origin) = match chosen {
            Some((value, origin)) => (Some(value), origin),
            None => (None, Origin::Default),
        };
        values.insert(key.name, (value, origin));
    }
    // Whatever the table did not take is unknown.
    for name in table.keys() {
        // A name no key could have is not shown: it may be a secret pasted in the wrong place.
        // Every key is lowercase words joined by `_`, with no digits, as no generated secret is.
        let plausible = name.len() <= 40
            && name
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte == b'_' || byte == b'-');
        errors.push(ConfigError {
            origin: Origin::File(path.clone().unwrap_or_default()),
            key: plausible.then(|| name.clone()),
            message: if plausible {
                "unknown key (see config.example.toml for the keys there are)".into()
            } else {
                "unknown key, not shown (too long, or with characters no key has: digits, capitals, ...; a value in the wrong place?)".into()
            },
        });
    }
    Ok(Values {
        values,
        file: path,
        file_keys,
        overridden,
        errors,
    })
}

fn error(key: &Key, origin: &Origin, message: String) -> ConfigError {
    ConfigError {
        origin: origin.clone(),
        key: Some(key.name.into()),
        message,
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let whole_file = |message: String| ConfigError {
        origin: Origin::File(path.to_path_buf()),
        key: None,
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|err| whole_file(format!("cannot read the file: {err}")))?;
    text.parse().map_err(|err: toml::de::Error| {
        // Where, never what: the line may hold a secret.
        let at = err.span().map_or(String::new(), |span| {
            let before = text.get(..span.start).unwrap_or(&text);
            let line = before.matches('\n').count() + 1;
            let column = before
                .rsplit('\n')
                .next()
                .map_or(0, |start| start.chars().count())
                + 1;
            format!(" at line {line}, column {column}")
        });
        whole_file(format!("not valid TOML{at}: {}", err.message()))
    })
}

/// A variable's text as the values of its key: lists are comma-separated.
fn split_env(key: &Key, text: String) -> Vec<String> {
    match key.kind {
        Kind::Texts | Kind::Integers => text.split(',').map(str::to_string).collect(),
        _ => vec![text],
    }
}

/// What a key's kind expects, for messages.
fn expected(kind: Kind) -> String {
    match kind {
        Kind::Text { .. } => "a string".into(),
        Kind::Duration { .. } => "a duration string like \"500ms\", \"30s\" or \"10m\"".into(),
        Kind::Integer { min, max } => format!("an integer from {min} to {max}"),
        Kind::Bool => "true or false".into(),
        Kind::Choice(names) => format!("one of {}", names.join(", ")),
        Kind::Texts => "an array of strings".into(),
        Kind::Integers => "an array of integers".into(),
    }
}

/// Deadlines are added to the clock; beyond a year they could overflow it, and no real wait is
/// that long.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The checks on one value, whatever layer gave it.
fn check(kind: Kind, value: Value) -> Result<Value, String> {
    match (kind, &value) {
        (Kind::Duration { zero }, Value::Duration(duration)) => {
            // Zero is meaningful only where a key says so (no drain, no restart delay, ...).
            if duration.is_zero() && !zero {
                return Err("must be greater than zero".into());
            }
            if *duration > MAX_DURATION {
                return Err("must be at most 365d".into());
            }
        }
        (Kind::Integer { min, .. }, Value::Integer(number)) if *number < min => {
            return Err(format!("must be at least {min}"));
        }
        _ => {}
    }
    Ok(value)
}

/// Parses flag or variable text. `Ok(None)`: an empty value of a key where empty means unset.
fn parse_texts(key: &Key, texts: &[String]) -> Result<Option<Value>, String> {
    let found = |text: &str| {
        if key.secret {
            "a string".to_string()
        } else {
            format!("{text:?}")
        }
    };
    let mistake = |text: &str| {
        format!(
            "expected {}, found {}",
            expected_text(key.kind),
            found(text)
        )
    };
    let text = texts.first().map_or("", String::as_str);
    let value = match key.kind {
        Kind::Text { empty_is_unset } => {
            if empty_is_unset && text.is_empty() {
                return Ok(None);
            }
            Value::Text(text.to_string())
        }
        Kind::Duration { .. } => Value::Duration(parse_duration(text).map_err(|_| mistake(text))?),
        Kind::Integer { max, .. } => match text.trim().parse::<u64>() {
            Ok(number) if number <= max => Value::Integer(number),
            _ => return Err(mistake(text)),
        },
        Kind::Bool => match text.trim() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(mistake(text)),
        },
        Kind::Choice(names) => match names.iter().find(|name| **name == text.trim()) {
            Some(name) => Value::Text((*name).to_string()),
            None => return Err(mistake(text)),
        },
        Kind::Texts => Value::Texts(texts.to_vec()),
        Kind::Integers => {
            let mut numbers = Vec::with_capacity(texts.len());
            for text in texts {
                numbers.push(text.trim().parse::<i32>().map_err(|_| mistake(text))?);
            }
            Value::Integers(numbers)
        }
    };
    check(key.kind, value).map(Some)
}

/// What a key's kind expects of a flag's or variable's text, for messages.
fn expected_text(kind: Kind) -> String {
    match kind {
        Kind::Duration { .. } => "a duration like \"500ms\", \"30s\" or \"10m\"".into(),
        Kind::Integers => "integers separated by commas".into(),
        other => expected(other),
    }
}

/// Parses a file's value. `Ok(None)`: an empty value of a key where empty means unset.
fn parse_toml(key: &Key, raw: &toml::Value) -> Result<Option<Value>, String> {
    // Keys that may hold secrets (API keys, tokens in vLLM's arguments or environment) are
    // described by their type only.
    let mistake = || {
        let found = match raw {
            other if key.secret => {
                let kind = other.type_str();
                let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                };
                format!("{article} {kind}")
            }
            toml::Value::String(text) => format!("{text:?}"),
            other => other.to_string(),
        };
        format!("expected {}, found {found}", expected(key.kind))
    };
    let value = match (key.kind, raw) {
        (Kind::Text { empty_is_unset }, toml::Value::String(text)) => {
            if empty_is_unset && text.is_empty() {
                return Ok(None);
            }
            Value::Text(text.clone())
        }
        (Kind::Duration { .. }, toml::Value::String(text)) => {
            Value::Duration(parse_duration(text).map_err(|_| mistake())?)
        }
        (Kind::Integer { max, .. }, toml::Value::Integer(number)) => match u64::try_from(*number) {
            Ok(number) if number <= max => Value::Integer(number),
            _ => return Err(mistake()),
        },
        (Kind::Bool, toml::Value::Boolean(value)) => Value::Bool(*value),
        (Kind::Choice(names), toml::Value::String(text)) => {
            match names.iter().find(|name| **name == text) {
                Some(name) => Value::Text((*name).to_string()),
                None => return Err(mistake()),
            }
        }
        (Kind::Texts, toml::Value::Array(items)) => Value::Texts(
            items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(mistake)?,
        ),
        (Kind::Integers, toml::Value::Array(items)) => Value::Integers(
            items
                .iter()
                .map(|item| {
                    item.as_integer()
                        .and_then(|number| i32::try_from(number).ok())
                })
                .collect::<Option<_>>()
                .ok_or_else(mistake)?,
        ),
        _ => return Err(mistake()),
    };
    check(key.kind, value).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_parses_as_its_key_says() {
        for key in KEYS {
            if let Some(default) = key.default {
                let value = parse_texts(key, &[default.to_string()]);
                assert!(
                    matches!(value, Ok(Some(_))),
                    "{}: {default:?} gives {value:?}",
                    key.name
                );
            }
        }
    }
}
