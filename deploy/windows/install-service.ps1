#Requires -Version 5.1
<#
.SYNOPSIS
  Installs maintenance-bridge as a Windows service: a Python venv, the package, and an NSSM
  service running as its own virtual account. Re-run it to change settings or upgrade.

.DESCRIPTION
  Why NSSM and not New-Service: New-Service only registers an executable that speaks the Service
  Control Manager protocol; a Python console program does not, and the SCM kills it after 30 s
  (error 1053). NSSM is the wrapper that speaks it. It stops the bridge the way the bridge expects
  on Windows, with a console Ctrl+C (KeyboardInterrupt in Python, which drains the outbox),
  falling back to terminating it after AppStopMethodConsole ms; it restarts it when it exits and
  rotates its log file. NSSM is not downloaded unpinned: pass -Nssm (for example from
  `winget install NSSM.NSSM` or `choco install nssm`), or -NssmSha256 with the hash your
  organisation has verified for -NssmZipUrl.

  Runs as Administrator. Step by step: docs/operations.md, "Windows Server".

.EXAMPLE
  .\install-service.ps1 -Topic projects/my-project/topics/maintenance -Nssm C:\tools\nssm.exe

.EXAMPLE
  .\install-service.ps1 -Topic projects/p/topics/t -Package C:\dist\maintenance_bridge-0.1.0-py3-none-any.whl `
    -NssmSha256 <verified sha256 of nssm-2.24.zip>
#>
[CmdletBinding()]
param(
  # projects/PROJECT/topics/TOPIC; empty keeps the service's current value (or stdout if none).
  [string]$Topic = '',
  # Anything pip installs: maintenance-bridge==X.Y.Z, a wheel path or URL, a source tree.
  [string]$Package = 'maintenance-bridge',
  [string]$Prefix = (Join-Path $env:ProgramFiles 'maintenance-bridge'),
  # The bridge's own default on Windows (%ProgramData%\maintenance-bridge): SQLite state + outbox.
  [string]$StateDir = (Join-Path $env:ProgramData 'maintenance-bridge'),
  # A python.exe of 3.10 or newer; default: the `py -3` launcher's choice, else python.exe on PATH.
  [string]$Python = '',
  [string]$Nssm = '',
  [string]$NssmZipUrl = 'https://nssm.cc/release/nssm-2.24.zip',
  [string]$NssmSha256 = '',
  [string]$ServiceName = 'maintenance-bridge',
  # Port of /healthz, /readyz and /metrics on 127.0.0.1; 0 turns the endpoint off.
  [int]$HttpPort = 8799,
  # More BRIDGE_* settings, e.g. @{ BRIDGE_LOG_LEVEL = 'DEBUG' }.
  [hashtable]$Settings = @{},
  # Extra pip install arguments, e.g. @('--index-url', 'https://...').
  [string[]]$PipArgs = @()
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

function Write-Step([string]$Message) { Write-Host "install-service: $Message" }

# Native programs report failure through $LASTEXITCODE, which $ErrorActionPreference ignores.
function Invoke-Native([string]$Exe, [string[]]$Arguments) {
  & $Exe @Arguments
  if ($LASTEXITCODE -ne 0) { throw "$Exe $($Arguments -join ' ') exited with $LASTEXITCODE" }
}

$principal = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
if (-not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
  throw 'Run this from an elevated PowerShell (Administrator).'
}

# --- 1. Python 3.10+ ------------------------------------------------------------------------
function Resolve-Python {
  if ($Python) { return $Python }
  $launcher = Get-Command py.exe -ErrorAction SilentlyContinue
  if ($launcher) {
    $exe = & $launcher.Source -3 -c 'import sys; print(sys.executable)'
    if ($LASTEXITCODE -eq 0 -and $exe) { return $exe.Trim() }
  }
  $onPath = Get-Command python.exe -ErrorAction SilentlyContinue
  # The WindowsApps stub opens the Store instead of running Python: not usable for a service.
  if ($onPath -and $onPath.Source -notlike '*\WindowsApps\*') { return $onPath.Source }
  throw 'No Python found. Install Python 3.12 for all users (python.org installer, or ' +
        '`winget install Python.Python.3.12 --scope machine`), or pass -Python C:\path\python.exe.'
}
$pythonExe = Resolve-Python
& $pythonExe -c 'import sys; sys.exit(sys.version_info < (3, 10))'
if ($LASTEXITCODE -ne 0) { throw "$pythonExe is older than Python 3.10" }
# The service's virtual account must be able to read the base interpreter the venv points at:
# a per-user install (under C:\Users\...) is private to that user.
if ($pythonExe -like "$env:SystemDrive\Users\*") {
  throw "$pythonExe is a per-user Python; install Python for all users (C:\Program Files\Python3xx)."
}
Write-Step "Python: $pythonExe"

# --- 2. NSSM --------------------------------------------------------------------------------
function Resolve-Nssm {
  if ($Nssm) { return (Resolve-Path $Nssm).Path }
  $found = Get-Command nssm.exe -ErrorAction SilentlyContinue
  if ($found) { return $found.Source }
  if (-not $NssmSha256) {
    throw 'NSSM not found. Pass -Nssm C:\path\nssm.exe (winget install NSSM.NSSM / choco install nssm), ' +
          "or -NssmSha256 <verified hash> to download $NssmZipUrl."
  }
  $zip = Join-Path $env:TEMP 'nssm.zip'
  Write-Step "downloading $NssmZipUrl"
  [Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12
  Invoke-WebRequest -Uri $NssmZipUrl -OutFile $zip -UseBasicParsing
  $actual = (Get-FileHash -Algorithm SHA256 $zip).Hash
  if ($actual -ne $NssmSha256.ToUpperInvariant()) {
    Remove-Item $zip
    throw "nssm.zip SHA-256 is $actual, expected ${NssmSha256}: not installing it."
  }
  $unpacked = Join-Path $env:TEMP 'nssm'
  Expand-Archive -Path $zip -DestinationPath $unpacked -Force
  $arch = if ([Environment]::Is64BitOperatingSystem) { 'win64' } else { 'win32' }
  $source = Get-ChildItem -Path $unpacked -Recurse -Filter nssm.exe |
    Where-Object { $_.DirectoryName -like "*\$arch" } | Select-Object -First 1
  if (-not $source) { throw "no $arch\nssm.exe inside $NssmZipUrl" }
  New-Item -ItemType Directory -Force -Path $Prefix | Out-Null
  $target = Join-Path $Prefix 'nssm.exe'
  Copy-Item $source.FullName $target -Force
  return $target
}
$nssmExe = Resolve-Nssm
Write-Step "NSSM: $nssmExe"

# --- 3. The venv and the package ------------------------------------------------------------
$venv = Join-Path $Prefix 'venv'
$venvPython = Join-Path $venv 'Scripts\python.exe'
$bridgeExe = Join-Path $venv 'Scripts\maintenance-bridge.exe'
New-Item -ItemType Directory -Force -Path $Prefix | Out-Null
$existing = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
if ($existing -and $existing.Status -ne 'Stopped') {
  # pip cannot replace maintenance-bridge.exe while the service runs it (Windows locks it).
  Write-Step "stopping $ServiceName for the upgrade"
  Invoke-Native $nssmExe @('stop', $ServiceName)
}
if (-not (Test-Path $venvPython)) {
  Write-Step "creating venv $venv"
  Invoke-Native $pythonExe @('-m', 'venv', $venv)
}
Write-Step "pip install $Package"
Invoke-Native $venvPython (@('-m', 'pip', 'install', '--disable-pip-version-check', '--no-input') + $PipArgs + @($Package))
if (-not (Test-Path $bridgeExe)) { throw "$bridgeExe missing after pip install" }

# --- 4. The service -------------------------------------------------------------------------
$logDir = Join-Path $StateDir 'logs'
New-Item -ItemType Directory -Force -Path $logDir | Out-Null
if (-not $existing) {
  Write-Step "registering service $ServiceName"
  Invoke-Native $nssmExe @('install', $ServiceName, $bridgeExe, 'run')
}
function Set-Nssm([string]$Name, [string[]]$Values) {
  Invoke-Native $nssmExe (@('set', $ServiceName, $Name) + $Values)
}
Set-Nssm 'Application' @($bridgeExe)
Set-Nssm 'AppParameters' @('run')
Set-Nssm 'AppDirectory' @($StateDir)
Set-Nssm 'DisplayName' @('maintenance-bridge')
Set-Nssm 'Description' @('Publishes Compute Engine maintenance and preemption notices to Pub/Sub.')
Set-Nssm 'Start' @('SERVICE_DELAYED_AUTO_START')
# Ctrl+C first, with time for the drain (BRIDGE_DRAIN_TIMEOUT, 5 s by default); only then
# WM_CLOSE and, last, TerminateProcess.
Set-Nssm 'AppStopMethodConsole' @('15000')
Set-Nssm 'AppStopMethodWindow' @('5000')
Set-Nssm 'AppStopMethodThreads' @('5000')
# Restart whenever it exits, after 1 s; a run shorter than 5 s counts as a failed start.
Set-Nssm 'AppExit' @('Default', 'Restart')
Set-Nssm 'AppRestartDelay' @('1000')
Set-Nssm 'AppThrottle' @('5000')
# stderr carries the JSON log; stdout carries events only with the stdout sink.
$logFile = Join-Path $logDir 'bridge.log'
Set-Nssm 'AppStdout' @($logFile)
Set-Nssm 'AppStderr' @($logFile)
Set-Nssm 'AppRotateFiles' @('1')
Set-Nssm 'AppRotateOnline' @('1')
Set-Nssm 'AppRotateBytes' @('10485760')

# Settings: the service's environment. A -Topic of '' keeps the value already configured.
$envVars = [ordered]@{
  BRIDGE_STATE_DIR  = $StateDir
  BRIDGE_LOG_FORMAT = 'json'
  BRIDGE_HTTP_PORT  = "$HttpPort"
  PYTHONUNBUFFERED  = '1'
}
if (-not $Topic -and $existing) {
  # nssm writes UTF-16 to a pipe: drop the NULs PowerShell leaves between the characters.
  $current = @(& $nssmExe get $ServiceName AppEnvironmentExtra 2>$null) -replace "`0", ''
  $line = $current | Where-Object { $_ -like 'BRIDGE_TOPIC=*' } | Select-Object -First 1
  if ($line) { $Topic = $line.Substring('BRIDGE_TOPIC='.Length) }
}
if ($Topic) { $envVars['BRIDGE_TOPIC'] = $Topic }
foreach ($key in $Settings.Keys) { $envVars[$key] = [string]$Settings[$key] }
Set-Nssm 'AppEnvironmentExtra' @($envVars.GetEnumerator() | ForEach-Object { "$($_.Key)=$($_.Value)" })

# Least privilege: a per-service virtual account (NT SERVICE\<name>), not LocalSystem. It needs
# no password, reads the venv like any user, gets credentials from the metadata server like the
# VM, and may write only its state directory.
$account = "NT SERVICE\$ServiceName"
Invoke-Native 'sc.exe' @('config', $ServiceName, 'obj=', $account)
Invoke-Native 'icacls.exe' @($StateDir, '/grant', "${account}:(OI)(CI)M", '/T', '/Q')

Write-Step "starting $ServiceName"
Invoke-Native $nssmExe @('start', $ServiceName)
Start-Sleep -Seconds 3
$status = (@(& $nssmExe status $ServiceName) -replace "`0", '') -join ''
Write-Step "status: $status; log: $logFile"
if ($HttpPort -gt 0) { Write-Step "health: Invoke-WebRequest http://127.0.0.1:$HttpPort/healthz -UseBasicParsing" }
