//! The state file, `DIR/state.json`: the devices added at run time
//! (`vcdev ctl add`) and the run-time changes to every device (`vcdev ctl
//! resize` of a RAM disk, `vcdev ctl set`), so that they survive a restart.
//!
//! Each change is written atomically: the new file is written beside the
//! old one, synced, then renamed over it. At start-up `vcdev serve` merges
//! it with its `--device` options ([`merge`]): a `--device` whose name is a
//! device of the state file is an error (exit 2), since the same name
//! would mean two devices.
//!
//! A change is kept as `key=value` SPEC options applied after the device's
//! own SPEC (later options win), so the file needs no format of its own
//! beyond the SPEC grammar.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, DeviceSpec};

/// The state file's name under `DIR`.
pub const STATE_FILE: &str = "state.json";

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// It could not be read or written.
    #[error("State file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid JSON of the expected shape.
    #[error("State file {path} is corrupt")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// What the state file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format version, 1.
    pub version: u32,
    /// Devices added with `vcdev ctl add`: their SPEC, with `name=`.
    #[serde(default)]
    pub added: Vec<String>,
    /// Per device name: SPEC options changed at run time, in order.
    #[serde(default)]
    pub changes: BTreeMap<String, Vec<String>>,
}

impl State {
    /// Reads `DIR/state.json`; an absent file is an empty state.
    pub fn load(dir: &Path) -> Result<State, StateError> {
        let path = dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(State {
                    version: 1,
                    ..State::default()
                })
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_str(&text).map_err(|source| StateError::Parse { path, source })
    }

    /// Writes `DIR/state.json` atomically (write, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_string_pretty(self)
            .map_err(std::io::Error::other)
            .map_err(io)?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// The SPEC of device `name` with its changes applied.
    pub fn effective(&self, name: &str, spec: &str) -> String {
        let mut s = spec.to_owned();
        for c in self.changes.get(name).into_iter().flatten() {
            s.push(',');
            s.push_str(c);
        }
        s
    }

    /// Records the change `key=value` of device `name` (replacing an
    /// earlier change of the same key).
    pub fn record_change(&mut self, name: &str, key: &str, value: &str) {
        let list = self.changes.entry(name.to_owned()).or_default();
        list.retain(|c| c.split_once('=').map(|(k, _)| k) != Some(key));
        list.push(format!("{key}={value}"));
    }

    /// Forgets device `name` (removed).
    pub fn forget(&mut self, name: &str) {
        self.changes.remove(name);
        self.added.retain(|s| spec_name(s).as_deref() != Some(name));
    }
}

/// The `name=` of a SPEC, if it has one (the last one wins).
pub fn spec_name(spec: &str) -> Option<String> {
    spec.rsplit(',')
        .find_map(|kv| kv.strip_prefix("name="))
        .map(str::to_owned)
}

/// Where a device comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `--device` on the command line (or the default device).
    CommandLine,
    /// `vcdev ctl add` (kept in the state file).
    Added,
}

/// One device to build at start-up: its effective SPEC string, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Parsed, changes applied.
    pub spec: DeviceSpec,
    /// The SPEC it was made from, without the changes.
    pub source: String,
    /// Where it comes from.
    pub origin: Origin,
}

/// Merges the command line's devices (`(source, spec)`, `default` when it
/// gave none and the daemon made its default device) with the state file:
/// command-line devices first, then the added ones. A name in both is
/// [`ConfigError::StateClash`]; the default device is dropped when the
/// state file has devices of its own.
pub fn merge(
    command_line: &[(String, DeviceSpec)],
    default: bool,
    state: &State,
) -> Result<Vec<Planned>, ConfigError> {
    let mut out = Vec::new();
    if !default || state.added.is_empty() {
        for (source, spec) in command_line {
            let spec = if state.changes.contains_key(&spec.name) {
                DeviceSpec::parse(&state.effective(&spec.name, source), 0)?
            } else {
                spec.clone()
            };
            out.push(Planned {
                spec,
                source: source.clone(),
                origin: Origin::CommandLine,
            });
        }
    }
    for source in &state.added {
        let name = spec_name(source).unwrap_or_default();
        let spec = DeviceSpec::parse(&state.effective(&name, source), 0)?;
        if out.iter().any(|p| p.spec.name == spec.name) {
            return Err(ConfigError::StateClash(spec.name));
        }
        out.push(Planned {
            spec,
            source: source.clone(),
            origin: Origin::Added,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cl(s: &str) -> (String, DeviceSpec) {
        (s.to_owned(), DeviceSpec::parse(s, 0).unwrap())
    }

    #[test]
    fn save_load_round_trip_and_atomic_write() {
        let dir = std::env::temp_dir().join(format!("vcdev-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(State::load(&dir).unwrap().added.len(), 0);
        let mut s = State {
            version: 1,
            ..State::default()
        };
        s.added.push("blk,name=a,ram=1M".into());
        s.record_change("a", "ram", "2M");
        s.record_change("a", "ram", "4M");
        s.save(&dir).unwrap();
        let back = State::load(&dir).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.changes["a"], vec!["ram=4M".to_owned()]);
        assert!(!dir.join(".state.json.tmp").exists());
        std::fs::write(dir.join(STATE_FILE), "{not json").unwrap();
        assert!(matches!(State::load(&dir), Err(StateError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn merge_applies_changes_and_refuses_clashes() {
        let mut s = State {
            version: 1,
            ..State::default()
        };
        s.added.push("blk,name=b,ram=1M".into());
        s.record_change("b", "ram", "2M");
        s.record_change("a", "ram", "8M");
        let p = merge(&[cl("blk,name=a,ram=4M")], false, &s).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].spec.backing, crate::config::Backing::Ram(8 << 20));
        assert_eq!(p[1].spec.backing, crate::config::Backing::Ram(2 << 20));
        assert_eq!(p[1].origin, Origin::Added);
        let e = merge(&[cl("blk,name=b")], false, &s).unwrap_err();
        assert_eq!(e, ConfigError::StateClash("b".into()));
        // The default device gives way to the state file's devices.
        let p = merge(&[cl("blk")], true, &s).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].spec.name, "b");
        s.forget("b");
        assert!(s.added.is_empty() && !s.changes.contains_key("b"));
    }
}
