//! The git side of `publish`: a bare mirror kept under the work directory, and
//! checkouts and bundles made from it. Plain `git` commands; nothing here prompts.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::PublishError;

/// A bare mirror of the repository being published.
#[derive(Debug, Clone)]
pub struct Mirror {
    path: PathBuf,
    origin: String,
}

/// The commit to publish and the branch it is the head of, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub commit: String,
    pub branch: Option<String>,
}

impl Mirror {
    /// Clones `origin` into `path` the first time, fetches into it after.
    pub fn sync(origin: &str, path: &Path) -> Result<Mirror, PublishError> {
        if path.join("HEAD").exists() {
            git(path, &["fetch", "--prune", "--quiet", "origin"])
                .map_err(|e| PublishError::Git(format!("fetching {origin}: {e}")))?;
        } else {
            let partial = path.with_extension("partial");
            let _ = std::fs::remove_dir_all(&partial);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| PublishError::Io(format!("creating {}: {e}", parent.display())))?;
            }
            let out = Command::new("git")
                .args(["clone", "--mirror", "--quiet", origin])
                .arg(&partial)
                .env("GIT_TERMINAL_PROMPT", "0")
                .output()
                .map_err(|e| PublishError::Git(format!("running git: {e}")))?;
            if !out.status.success() {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(PublishError::Git(format!(
                    "cannot clone the repository {origin}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            std::fs::rename(&partial, path)
                .map_err(|e| PublishError::Io(format!("moving the mirror into place: {e}")))?;
        }
        Ok(Mirror {
            path: path.to_owned(),
            origin: origin.to_owned(),
        })
    }

    /// The commit `git_ref` names (the default branch when `None`).
    pub fn resolve(&self, git_ref: Option<&str>) -> Result<Head, PublishError> {
        let name = git_ref.unwrap_or("HEAD");
        let commit = git(
            &self.path,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{name}^{{commit}}"),
            ],
        )
        .map_err(|_| {
            PublishError::Git(format!(
                "the ref `{name}` does not exist in {}",
                self.origin
            ))
        })?;
        let branch = match git_ref {
            None => git(&self.path, &["symbolic-ref", "--quiet", "--short", "HEAD"]).ok(),
            Some(name) => git(
                &self.path,
                &[
                    "show-ref",
                    "--verify",
                    "--quiet",
                    &format!("refs/heads/{name}"),
                ],
            )
            .ok()
            .map(|_| name.to_owned()),
        };
        Ok(Head {
            commit: commit.trim().to_owned(),
            branch: branch.map(|b| b.trim().to_owned()),
        })
    }

    /// Whether `ancestor` is in the history of `commit`.
    pub fn is_ancestor(&self, ancestor: &str, commit: &str) -> bool {
        git(
            &self.path,
            &["merge-base", "--is-ancestor", ancestor, commit],
        )
        .is_ok()
    }

    /// A bundle of the commits from `from` to the head of `branch`.
    pub fn bundle(&self, from: &str, branch: &str, out: &Path) -> Result<(), PublishError> {
        let out = out.display().to_string();
        git(
            &self.path,
            &[
                "bundle",
                "create",
                "--quiet",
                &out,
                &format!("{from}..refs/heads/{branch}"),
            ],
        )
        .map(drop)
        .map_err(|e| PublishError::Git(format!("creating the bundle: {e}")))
    }

    /// A working tree with its `.git` at `head`, on its branch, with `origin` pointing
    /// at the published repository rather than at the mirror.
    pub fn checkout(&self, head: &Head, into: &Path) -> Result<(), PublishError> {
        let into_text = into.display().to_string();
        let mirror = self.path.display().to_string();
        git(
            Path::new("."),
            &["clone", "--quiet", "--no-checkout", &mirror, &into_text],
        )
        .map_err(|e| PublishError::Git(format!("cloning the mirror: {e}")))?;
        let checkout = match &head.branch {
            Some(branch) => git(into, &["checkout", "--quiet", "-B", branch, &head.commit]),
            None => git(into, &["checkout", "--quiet", "--detach", &head.commit]),
        };
        checkout.map_err(|e| PublishError::Git(format!("checking out {}: {e}", head.commit)))?;
        git(into, &["remote", "set-url", "origin", &self.origin])
            .map_err(|e| PublishError::Git(format!("setting origin: {e}")))?;
        Ok(())
    }
}

/// Runs git in `dir`; its stdout, or its stderr as the error.
fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|e| format!("running git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
