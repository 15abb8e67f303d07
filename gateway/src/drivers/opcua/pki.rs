//! The gateway's OPC-UA certificate folders (`DATA_DIR/pki`) and `updraft opcua trust`: an
//! unknown server certificate lands in `rejected/`, and trusting it moves it to `trusted/`.

use std::path::{Path, PathBuf};

/// The certificates waiting in `rejected/` and those in `trusted/`, by file name.
pub fn list(pki: &Path) -> (Vec<String>, Vec<String>) {
    let names = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(pki.join(dir))
            .map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    (names("rejected"), names("trusted"))
}

/// Moves one rejected certificate to `trusted/`. `name` is its file name or a unique part of it
/// (the server's name as it appears in the file name, or its thumbprint).
pub fn trust(pki: &Path, name: &str) -> Result<PathBuf, String> {
    let (rejected, _) = list(pki);
    let matches: Vec<&String> = rejected.iter().filter(|f| f.as_str() == name || f.contains(name)).collect();
    let file = match matches.as_slice() {
        [one] => *one,
        [] if rejected.is_empty() => {
            return Err(format!(
                "{} holds no rejected certificate; a server's appears there after the gateway tries to connect to it",
                pki.join("rejected").display()
            ))
        }
        [] => return Err(format!("no rejected certificate matches `{name}`; waiting: {}", rejected.join(", "))),
        many => {
            let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
            return Err(format!("`{name}` matches several certificates: {}; give more of the name", names.join(", ")));
        }
    };
    let trusted_dir = pki.join("trusted");
    std::fs::create_dir_all(&trusted_dir).map_err(|e| format!("{}: {e}", trusted_dir.display()))?;
    let to = trusted_dir.join(file);
    std::fs::rename(pki.join("rejected").join(file), &to)
        .map_err(|e| format!("moving {file} to {}: {e}", to.display()))?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_moves_exactly_one_rejected_certificate() {
        let dir = std::env::temp_dir().join(format!("updraft-pki-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(trust(&dir, "x").unwrap_err().contains("no rejected certificate"));
        std::fs::create_dir_all(dir.join("rejected")).unwrap();
        std::fs::write(dir.join("rejected/PLC-1 [ab12].der"), b"1").unwrap();
        std::fs::write(dir.join("rejected/PLC-2 [cd34].der"), b"2").unwrap();
        assert!(trust(&dir, "PLC").unwrap_err().contains("several"));
        assert!(trust(&dir, "nothing").unwrap_err().contains("PLC-1"));
        let to = trust(&dir, "cd34").unwrap();
        assert_eq!(to, dir.join("trusted/PLC-2 [cd34].der"));
        assert_eq!(list(&dir), (vec!["PLC-1 [ab12].der".to_owned()], vec!["PLC-2 [cd34].der".to_owned()]));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
