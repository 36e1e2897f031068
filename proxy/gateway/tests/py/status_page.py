"""Opens the admin status page in headless Chromium (Debian chromium +
chromium-driver, through Selenium), saves a screenshot and prints what it
shows as JSON. usage: status_page.py ADMIN_URL OUT_DIR"""
import json
import os
import sys
import tempfile

os.environ.setdefault("SE_OFFLINE", "true")
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--user-data-dir=" + tempfile.mkdtemp(prefix="tollgate-chromium-"), "--window-size=1280,1100"]:
    opts.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.get(url + "/")
    result = {
        "title": driver.title,
        "headings": [h.text for h in driver.find_elements(By.TAG_NAME, "h2")],
        "sparklines": len(driver.find_elements(By.CSS_SELECTOR, "svg polyline")),
        "text": driver.find_element(By.TAG_NAME, "main").text,
        "external": [e.get_attribute("src") or e.get_attribute("href") for e in driver.find_elements(By.CSS_SELECTOR, "script[src], link[href], img[src]")],
    }
    driver.save_screenshot(os.path.join(out, "status-page.png"))
finally:
    driver.quit()
print(json.dumps(result))
