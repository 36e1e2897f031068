"""Drives the consumer dashboard in a real headless Chromium (Debian's
chromium + chromium-driver, through Selenium) and prints what it saw as JSON.

usage: dashboard.py BASE_URL KEY OUT_DIR

Pastes KEY, waits for the plan and the limit bars, saves screenshots
(phone and desktop widths) to OUT_DIR, checks that the key is in no URL,
cookie or storage and that the page raised no CSP violation, then clicks
"Upgrade to pro" and reports where the browser went.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium fetch a driver

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

base, key, out = sys.argv[1], sys.argv[2], sys.argv[3]
# Screenshots are named after this (a second run keeps the first's).
name = sys.argv[4] if len(sys.argv) > 4 else "dashboard"
# The button clicked at the end: `[data-plan=pro]` (upgrade) or a credit pack.
click = "[data-credits]" if len(sys.argv) > 5 and sys.argv[5] == "buy" else "[data-plan=pro]"
os.makedirs(out, exist_ok=True)

opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--user-data-dir=" + tempfile.mkdtemp(prefix="tollgate-chromium-"),
    "--window-size=412,915",
]:
    opts.add_argument(flag)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
result = {}
try:
    wait = WebDriverWait(driver, 15)
    driver.get(base + "/_tollgate/")
    field = driver.find_element(By.ID, "key")
    label = driver.find_element(By.CSS_SELECTOR, "label[for=key]").text
    # Keyboard only: type the key and press Enter.
    field.send_keys(key)
    field.send_keys("\n")
    wait.until(lambda d: d.find_element(By.ID, "plan").text.strip() != "")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#limits [role=progressbar]")) > 0)
    bars = driver.find_elements(By.CSS_SELECTOR, "#limits [role=progressbar]")
    result["label"] = label
    result["plan"] = driver.find_element(By.ID, "plan").text
    result["bars"] = [
        {"label": b.get_attribute("aria-label"), "now": int(b.get_attribute("aria-valuenow")), "max": int(b.get_attribute("aria-valuemax"))}
        for b in bars
    ]
    result["limit_text"] = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#limits li")]
    result["usage_rows"] = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#usage tbody tr")]
    result["upgrade_buttons"] = [b.text for b in driver.find_elements(By.CSS_SELECTOR, "[data-plan]")]
    credits = driver.find_element(By.ID, "credits")
    result["credits"] = credits.text if credits.is_displayed() else None
    result["buy_buttons"] = [b.text for b in driver.find_elements(By.CSS_SELECTOR, "[data-credits]") if b.is_displayed()]
    driver.save_screenshot(os.path.join(out, name + "-phone.png"))
    driver.set_window_size(1280, 900)
    driver.save_screenshot(os.path.join(out, name + "-desktop.png"))
    # Where the key could leak: none of these may hold it.
    result["key_in_url"] = key in driver.current_url
    result["cookies"] = driver.get_cookies()
    result["storage"] = driver.execute_script("return localStorage.length + sessionStorage.length")
    result["key_in_dom"] = key in driver.page_source
    result["csp_violations"] = [
        e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]
    ]
    upgrade = driver.find_element(By.CSS_SELECTOR, click)
    upgrade.click()
    wait.until(EC.url_contains("/c/pay/"))
    result["after_upgrade"] = driver.current_url
    result["key_in_url_after_upgrade"] = key in driver.current_url
finally:
    driver.quit()
print(json.dumps(result))
